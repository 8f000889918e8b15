//! Registry host configuration: containerd's `config_path` directory of `hosts.toml`
//! files, and the deprecated CRI `registry.mirrors` / `registry.configs` keys.
//!
//! For a registry `host` (as it appears in a reference: `docker.io`, `localhost:5000`),
//! the directory looked up under `config_path` is, in order: the `host_port_` form
//! (`localhost_5000_`, containerd's escaping of `:`), the host as written
//! (`localhost:5000`), then `_default`. The first that exists is used.
//!
//! A `hosts.toml` lists `[host."<url>"]` entries, tried in file order, then the
//! top-level `server` (the upstream). Each entry may set `capabilities` (`pull`,
//! `resolve`, `push`; all three by default), `skip_verify`, `ca` (a path or a list, relative
//! paths are relative to the host directory), `client` (a path, a list of paths, or a list
//! of `[cert, key]` pairs), `header` (a map of strings or string lists) and
//! `override_path` (the URL path is the API root, no `/v2` appended).
//!
//! A directory without `hosts.toml` uses Docker's certs.d layout: `*.crt` are CAs, and
//! `*.cert` with a matching `*.key` are client pairs. With no directory at all the
//! registry itself is the only host: `https`, except `docker.io` (served by
//! `registry-1.docker.io`) and loopback hosts (plain `http`, as containerd does).

use crate::reference::is_localhost;
use berth_core::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a host may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    pub const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// TLS settings of one host (all empty: system roots, no client certificate).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct TlsSettings {
    pub skip_verify: Option<bool>,
    /// PEM files with extra CA certificates (added to the system roots).
    pub ca: Vec<PathBuf>,
    /// Client certificate and key files; a missing key means the key is in the cert file.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
}

/// One endpoint to try for a registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryHost {
    pub scheme: String,
    /// `host[:port]`
    pub host: String,
    /// API root path, `/v2` unless overridden.
    pub path: String,
    pub capabilities: Capabilities,
    /// Extra headers sent with every request to this host.
    pub headers: Vec<(String, String)>,
    pub tls: TlsSettings,
}

impl RegistryHost {
    /// The default endpoint for `host` (no configuration).
    pub fn default_for(host: &str, default_scheme: Option<&str>) -> RegistryHost {
        let (scheme, h, skip) = if host == "docker.io" {
            (
                "https".to_string(),
                "registry-1.docker.io".to_string(),
                None,
            )
        } else if is_localhost(host) {
            match default_scheme {
                None | Some("http") => ("http".into(), host.to_string(), Some(true)),
                Some(s) => (s.to_string(), host.to_string(), None),
            }
        } else {
            (
                default_scheme.unwrap_or("https").to_string(),
                host.to_string(),
                None,
            )
        };
        RegistryHost {
            scheme,
            host: h,
            path: "/v2".into(),
            capabilities: Capabilities::ALL,
            headers: vec![],
            tls: TlsSettings {
                skip_verify: skip,
                ..Default::default()
            },
        }
    }

    /// `scheme://host/path`
    pub fn base_url(&self) -> String {
        format!("{}://{}{}", self.scheme, self.host, self.path)
    }
}

/// How to find the hosts of a registry.
#[derive(Debug, Clone, Default)]
pub struct HostOptions {
    /// containerd's `config_path`: may hold several directories separated by `:`.
    pub config_path: Option<String>,
    /// Scheme for hosts without configuration (`http` for `--plain-http`).
    pub default_scheme: Option<String>,
}

/// containerd's escaping of a `:port` in directory names: `host:5000` → `host_5000_`.
pub fn host_directory_name(host: &str) -> String {
    match host.rfind(':') {
        Some(i) if i > 0 => format!("{}_{}_", &host[..i], &host[i + 1..]),
        _ => host.to_string(),
    }
}

/// The directories looked at for `host` under `root`, in order.
pub fn host_dir_candidates(root: &Path, host: &str) -> Vec<PathBuf> {
    let mut out = vec![];
    let escaped = host_directory_name(host);
    if escaped != host {
        out.push(root.join(escaped));
    }
    out.push(root.join(host));
    out.push(root.join("_default"));
    out
}

/// The ordered endpoints for the registry `host`.
pub fn configure_hosts(opts: &HostOptions, host: &str) -> Result<Vec<RegistryHost>> {
    let mut hosts: Option<Vec<RegistryHost>> = None;
    if let Some(cp) = &opts.config_path {
        'roots: for root in cp.split(':').filter(|s| !s.is_empty()) {
            for dir in host_dir_candidates(Path::new(root), host) {
                if dir.is_dir() {
                    tracing::debug!(dir = %dir.display(), "loading host directory");
                    hosts = Some(load_host_dir(&dir)?);
                    break 'roots;
                }
            }
        }
    }
    let mut hosts = hosts.unwrap_or_else(|| vec![empty_host()]);
    // A trailing entry without a host (no `server`) is the registry itself.
    if let Some(last) = hosts.last_mut()
        && last.host.is_empty()
    {
        let mut d = RegistryHost::default_for(host, opts.default_scheme.as_deref());
        d.tls.ca = std::mem::take(&mut last.tls.ca);
        d.tls.client = std::mem::take(&mut last.tls.client);
        if last.tls.skip_verify.is_some() {
            d.tls.skip_verify = last.tls.skip_verify;
        }
        d.headers = std::mem::take(&mut last.headers);
        *last = d;
    }
    Ok(hosts)
}

fn empty_host() -> RegistryHost {
    RegistryHost {
        scheme: String::new(),
        host: String::new(),
        path: String::new(),
        capabilities: Capabilities::ALL,
        headers: vec![],
        tls: TlsSettings::default(),
    }
}

/// Loads one host directory: its `hosts.toml`, or certs.d-style files without one.
pub fn load_host_dir(dir: &Path) -> Result<Vec<RegistryHost>> {
    let file = dir.join("hosts.toml");
    match std::fs::read_to_string(&file) {
        Ok(text) if !text.trim().is_empty() => {
            parse_hosts_file(dir, &text).map_err(|e| e.context(format!("{}", file.display())))
        }
        Ok(_) => load_cert_files(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => load_cert_files(dir),
        Err(e) => Err(Error::unknown(format!("reading {}: {e}", file.display()))),
    }
}

/// Docker's certs.d layout: `*.crt` CAs, `*.cert` client certificates with `*.key` keys.
pub fn load_cert_files(dir: &Path) -> Result<Vec<RegistryHost>> {
    let mut h = empty_host();
    let mut names: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![],
        Err(e) => return Err(Error::unknown(format!("reading {}: {e}", dir.display()))),
    };
    names.sort();
    for p in names {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.ends_with(".crt") {
            h.tls.ca.push(p.clone());
        } else if let Some(stem) = name.strip_suffix(".cert") {
            let key = dir.join(format!("{stem}.key"));
            h.tls.client.push((p.clone(), key.exists().then_some(key)));
        }
    }
    Ok(vec![h])
}

fn abs(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn string_list(v: &toml::Value, what: &str) -> Result<Vec<String>> {
    match v {
        toml::Value::String(s) => Ok(vec![s.clone()]),
        toml::Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_string).ok_or_else(|| {
                    Error::invalid_argument(format!("invalid value {x} in {what:?}"))
                })
            })
            .collect(),
        other => Err(Error::invalid_argument(format!(
            "invalid type {} for {what:?}",
            other.type_str()
        ))),
    }
}

/// Parses one host entry (`server` may be empty for the top level without `server`).
fn parse_host_config(server: &str, base: &Path, t: &toml::Table) -> Result<RegistryHost> {
    let mut h = empty_host();
    let override_path = match t.get("override_path") {
        None => false,
        Some(toml::Value::Boolean(b)) => *b,
        Some(v) => {
            return Err(Error::invalid_argument(format!(
                "invalid override_path {v}"
            )));
        }
    };
    if !server.is_empty() {
        let with_scheme = if server.starts_with("http") {
            server.to_string()
        } else {
            format!("https://{server}")
        };
        let u = url::Url::parse(&with_scheme).map_err(|e| {
            Error::invalid_argument(format!("unable to parse server {server}: {e}"))
        })?;
        h.scheme = u.scheme().to_string();
        h.host = match (u.host_str(), u.port()) {
            (Some(hs), Some(p)) => format!("{hs}:{p}"),
            (Some(hs), None) => hs.to_string(),
            _ => return Err(Error::invalid_argument(format!("server {server}: no host"))),
        };
        let mut path = u.path().trim_end_matches('/').to_string();
        if path.is_empty() {
            if !override_path {
                path = "/v2".into();
            }
        } else if !path.ends_with("/v2") && !override_path {
            path.push_str("/v2");
        }
        h.path = path;
    }
    match t.get("skip_verify") {
        None => {}
        Some(toml::Value::Boolean(b)) => h.tls.skip_verify = Some(*b),
        Some(v) => return Err(Error::invalid_argument(format!("invalid skip_verify {v}"))),
    }
    if let Some(caps) = t.get("capabilities") {
        let list = string_list(caps, "capabilities")?;
        if !list.is_empty() {
            h.capabilities = Capabilities::default();
            for c in list {
                match c.to_ascii_lowercase().as_str() {
                    "pull" => h.capabilities.pull = true,
                    "resolve" => h.capabilities.resolve = true,
                    "push" => h.capabilities.push = true,
                    _ => return Err(Error::invalid_argument(format!("unknown capability {c}"))),
                }
            }
        }
    }
    if let Some(ca) = t.get("ca") {
        for p in string_list(ca, "ca")? {
            if p.is_empty() {
                // containerd would try to read the host directory itself as a PEM file
                // and fail; an empty path is taken to mean "no extra CA".
                tracing::warn!(dir = %base.display(), "ignoring empty \"ca\" path in hosts.toml");
                continue;
            }
            h.tls.ca.push(abs(base, &p));
        }
    }
    if let Some(client) = t.get("client") {
        match client {
            toml::Value::String(s) => h.tls.client.push((abs(base, s), None)),
            toml::Value::Array(items) => {
                for item in items {
                    match item {
                        toml::Value::String(s) => h.tls.client.push((abs(base, s), None)),
                        toml::Value::Array(pair) => {
                            let pair = string_list(&toml::Value::Array(pair.clone()), "client")?;
                            if pair.len() != 2 {
                                return Err(Error::invalid_argument(format!(
                                    "invalid pair {pair:?} for \"client\""
                                )));
                            }
                            h.tls
                                .client
                                .push((abs(base, &pair[0]), Some(abs(base, &pair[1]))));
                        }
                        other => {
                            return Err(Error::invalid_argument(format!(
                                "invalid type {} for \"client\"",
                                other.type_str()
                            )));
                        }
                    }
                }
            }
            other => {
                return Err(Error::invalid_argument(format!(
                    "invalid type {} for \"client\"",
                    other.type_str()
                )));
            }
        }
    }
    if let Some(hdr) = t.get("header") {
        let toml::Value::Table(map) = hdr else {
            return Err(Error::invalid_argument(
                "invalid type for \"header\"".to_string(),
            ));
        };
        for (k, v) in map {
            for value in string_list(v, &format!("header {k}"))? {
                h.headers.push((k.clone(), value));
            }
        }
    }
    Ok(h)
}

/// Parses a `hosts.toml` whose relative paths are relative to `base`: the `[host.*]`
/// entries in file order, then the top-level (`server`) entry.
pub fn parse_hosts_file(base: &Path, text: &str) -> Result<Vec<RegistryHost>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| Error::invalid_argument(format!("failed to parse TOML: {e}")))?;
    let mut hosts = vec![];
    if let Some(hs) = table.get("host") {
        let toml::Value::Table(hs) = hs else {
            return Err(Error::invalid_argument("invalid `host` tree"));
        };
        // `toml` is built with `preserve_order`, so this is file order.
        for (name, cfg) in hs {
            let toml::Value::Table(cfg) = cfg else {
                return Err(Error::invalid_argument(format!(
                    "host {name:?}: not a table"
                )));
            };
            hosts.push(parse_host_config(name, base, cfg)?);
        }
    }
    let server = match table.get("server") {
        None => "",
        Some(toml::Value::String(s)) => s.as_str(),
        Some(v) => return Err(Error::invalid_argument(format!("invalid server {v}"))),
    };
    let mut top = table.clone();
    top.remove("host");
    hosts.push(parse_host_config(server, base, &top)?);
    Ok(hosts)
}

/// A credential for one registry host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthConfig {
    pub username: String,
    pub password: String,
    /// A refresh token (`identitytoken`), used with the OAuth2 token endpoint.
    pub identity_token: String,
}

/// The result of converting the CRI plugin's deprecated registry keys.
#[derive(Debug, Clone, Default)]
pub struct CriRegistryConversion {
    /// `hosts.toml` text for each registry host directory name.
    pub hosts_toml: BTreeMap<String, String>,
    /// Credentials from `configs.<host>.auth`.
    pub auths: BTreeMap<String, AuthConfig>,
    /// One line per deprecated key found (to log as warnings).
    pub warnings: Vec<String>,
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Converts CRI's deprecated `[plugins."io.containerd.grpc.v1.cri".registry]` table
/// (`mirrors.<host>.endpoint`, `configs.<host>.tls`, `configs.<host>.auth`) into the
/// equivalent `hosts.toml` files and credentials, with a warning per key.
///
/// Mirrors become `[host."<endpoint>"]` entries with `pull` and `resolve`, tried in the
/// listed order; the registry itself is the `server` (`docker.io` →
/// `https://registry-1.docker.io`), as CRI appended the default endpoint last. TLS keys of
/// `configs.<h>` apply to the entries whose host is `h`.
pub fn convert_cri_registry(registry: &toml::Table) -> Result<CriRegistryConversion> {
    let mut out = CriRegistryConversion::default();
    let empty = toml::Table::new();
    let mirrors = registry
        .get("mirrors")
        .and_then(|v| v.as_table())
        .unwrap_or(&empty);
    let configs = registry
        .get("configs")
        .and_then(|v| v.as_table())
        .unwrap_or(&empty);
    if !mirrors.is_empty() {
        out.warnings.push(
            "registry.mirrors is deprecated: use config_path with hosts.toml (converted)".into(),
        );
    }
    if !configs.is_empty() {
        out.warnings.push(
            "registry.configs is deprecated: use config_path with hosts.toml and a credentials file (converted)"
                .into(),
        );
    }
    let tls_lines = |host: &str| -> Result<String> {
        let mut s = String::new();
        if let Some(tls) = configs
            .get(host)
            .and_then(|c| c.get("tls"))
            .and_then(|t| t.as_table())
        {
            if let Some(b) = tls.get("insecure_skip_verify").and_then(|v| v.as_bool()) {
                s.push_str(&format!("  skip_verify = {b}\n"));
            }
            if let Some(ca) = tls
                .get("ca_file")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
            {
                s.push_str(&format!("  ca = {}\n", toml_str(ca)));
            }
            let cert = tls
                .get("cert_file")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            let key = tls
                .get("key_file")
                .and_then(|v| v.as_str())
                .unwrap_or_default();
            if !cert.is_empty() {
                if key.is_empty() {
                    s.push_str(&format!("  client = {}\n", toml_str(cert)));
                } else {
                    s.push_str(&format!(
                        "  client = [[{}, {}]]\n",
                        toml_str(cert),
                        toml_str(key)
                    ));
                }
            }
        }
        Ok(s)
    };
    let url_host = |u: &str| -> String {
        let with = if u.contains("://") {
            u.to_string()
        } else {
            format!("https://{u}")
        };
        url::Url::parse(&with)
            .ok()
            .and_then(|p| {
                p.host_str().map(|h| match p.port() {
                    Some(port) => format!("{h}:{port}"),
                    None => h.to_string(),
                })
            })
            .unwrap_or_default()
    };
    let mut registries: Vec<String> = mirrors.keys().cloned().collect();
    for k in configs.keys() {
        if !registries.contains(k) {
            registries.push(k.clone());
        }
    }
    for reg in registries {
        if reg == "*" {
            out.warnings
                .push("registry.mirrors.\"*\" maps to the _default host directory".into());
        }
        let server = if reg == "docker.io" {
            "https://registry-1.docker.io".to_string()
        } else if reg == "*" {
            String::new()
        } else if is_localhost(&reg) {
            format!("http://{reg}")
        } else {
            format!("https://{reg}")
        };
        let mut text = String::new();
        if !server.is_empty() {
            text.push_str(&format!("server = {}\n", toml_str(&server)));
        }
        let endpoints = match mirrors.get(&reg).and_then(|m| m.get("endpoint")) {
            Some(v) => string_list(v, "endpoint")?,
            None => vec![],
        };
        for ep in &endpoints {
            let ep_url = if ep.contains("://") {
                ep.clone()
            } else {
                format!("https://{ep}")
            };
            let ep_url = ep_url.trim_end_matches('/').to_string();
            let h = url_host(&ep_url);
            if !server.is_empty() && ep_url == server {
                continue; // the upstream itself stays the last (server) entry
            }
            text.push_str(&format!(
                "\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
                toml_str(&ep_url)
            ));
            text.push_str(&tls_lines(&h)?);
        }
        let top_tls = tls_lines(&reg)?;
        if !top_tls.is_empty() {
            // Top-level keys must come before the first table.
            let (head, tail) = match text.find("\n[host.") {
                Some(i) => text.split_at(i),
                None => (text.as_str(), ""),
            };
            text = format!("{head}{}{tail}", top_tls.replace("  ", ""));
        }
        let dir = if reg == "*" {
            "_default".to_string()
        } else {
            reg.clone()
        };
        if let Some(auth) = configs
            .get(&reg)
            .and_then(|c| c.get("auth"))
            .and_then(|a| a.as_table())
        {
            let get = |k: &str| {
                auth.get(k)
                    .and_then(|v| v.as_str())
                    .unwrap_or_default()
                    .to_string()
            };
            let mut a = AuthConfig {
                username: get("username"),
                password: get("password"),
                identity_token: get("identitytoken"),
            };
            let encoded = get("auth");
            if !encoded.is_empty() {
                let (u, p) = crate::auth::decode_basic_auth(&encoded)?;
                a.username = u;
                a.password = p;
            }
            out.auths.insert(reg.clone(), a);
        }
        out.hosts_toml.insert(dir, text);
    }
    for w in &out.warnings {
        tracing::warn!("{w}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_dir_names() {
        assert_eq!(host_directory_name("localhost:5000"), "localhost_5000_");
        assert_eq!(host_directory_name("docker.io"), "docker.io");
        let c = host_dir_candidates(Path::new("/c"), "localhost:5000");
        assert_eq!(
            c,
            vec![
                PathBuf::from("/c/localhost_5000_"),
                PathBuf::from("/c/localhost:5000"),
                PathBuf::from("/c/_default")
            ]
        );
    }

    #[test]
    fn default_directory_and_escaped_names() {
        let root = tempfile::tempdir().unwrap();
        let w = |dir: &str, text: &str| {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
            std::fs::write(root.path().join(dir).join("hosts.toml"), text).unwrap();
        };
        w("_default", "[host.\"https://mirror.example\"]\n");
        w("localhost_5000_", "server = \"http://localhost:5000\"\n");
        w(
            "example.com:6000",
            "server = \"https://example.com:6000\"\nskip_verify = true\n",
        );
        let opts = HostOptions {
            config_path: Some(format!("/nonexistent:{}", root.path().display())),
            default_scheme: None,
        };
        let d = configure_hosts(&opts, "quay.io").unwrap();
        assert_eq!(d[0].base_url(), "https://mirror.example/v2");
        assert_eq!(d[1].base_url(), "https://quay.io/v2");
        let l = configure_hosts(&opts, "localhost:5000").unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].base_url(), "http://localhost:5000/v2");
        let e = configure_hosts(&opts, "example.com:6000").unwrap();
        assert_eq!(e[0].tls.skip_verify, Some(true));
    }

    #[test]
    fn defaults() {
        let h = configure_hosts(&HostOptions::default(), "docker.io").unwrap();
        assert_eq!(h[0].base_url(), "https://registry-1.docker.io/v2");
        let h = configure_hosts(&HostOptions::default(), "localhost:5000").unwrap();
        assert_eq!(h[0].base_url(), "http://localhost:5000/v2");
        let h = configure_hosts(&HostOptions::default(), "quay.io").unwrap();
        assert_eq!(h[0].base_url(), "https://quay.io/v2");
    }

    #[test]
    fn override_path_and_headers() {
        let t = r#"
server = "https://r.example/base"
[host."https://m.example/custom/api"]
  override_path = true
  capabilities = ["pull"]
  header = { x-a = "1", x-b = ["2", "3"] }
  ca = ["ca.pem", "/abs.pem"]
  client = [["c.pem", "k.pem"], "both.pem"]
"#;
        let h = parse_hosts_file(Path::new("/d"), t).unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].base_url(), "https://m.example/custom/api");
        assert_eq!(
            h[0].capabilities,
            Capabilities {
                pull: true,
                resolve: false,
                push: false
            }
        );
        assert_eq!(h[0].headers.len(), 3);
        assert_eq!(
            h[0].tls.ca,
            vec![PathBuf::from("/d/ca.pem"), PathBuf::from("/abs.pem")]
        );
        assert_eq!(
            h[0].tls.client[0],
            (PathBuf::from("/d/c.pem"), Some(PathBuf::from("/d/k.pem")))
        );
        assert_eq!(h[1].base_url(), "https://r.example/base/v2");
        assert!(parse_hosts_file(Path::new("/"), "[host.\"x\"]\ncapabilities=[\"fly\"]").is_err());
    }
}
