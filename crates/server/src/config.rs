//! containerd's `config.toml`, read unchanged.
//!
//! Version 2 files are the native form. Version 1 files (no `version`, or `version = 1`)
//! name plugin sections by short ID (`[plugins.cri]`); they are accepted and their
//! sections, `disabled_plugins` and `required_plugins` are mapped to the version 2 URIs
//! with a warning.
//!
//! Loading works on TOML tables rather than on the typed [`Config`], so that a key set in
//! a later file wins even when its value is a zero (containerd's struct merge cannot tell
//! a zero from "unset"):
//! - the embedded defaults come first, then the file, then its `imports` (globs and
//!   relative paths are resolved against the importing file's directory), breadth-first,
//!   each file loaded once;
//! - lists (`disabled_plugins`, `required_plugins`, `imports`) are appended, without
//!   duplicates;
//! - `[plugins."<uri>"]` sections are overlaid key by key, recursively, so a drop-in file
//!   can change one setting of a plugin without repeating the rest of its section
//!   (containerd 1.6 replaced whole sections; overlaying is what drop-in files expect);
//! - entries of `proxy_plugins`, `stream_processors` and `timeouts` replace the entry of
//!   the same name, as in containerd; other tables (`[grpc]`, …) are overridden key by key.
//!
//! Every file is also decoded on its own into [`Config`] so that a wrong type is reported
//! with the file, line and key, and unknown keys are reported as warnings, never errors.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where `berthd` looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/berth/config.toml";
pub const DEFAULT_ROOT: &str = "/var/lib/berth";
pub const DEFAULT_STATE: &str = "/run/berth";
pub const DEFAULT_GRPC_ADDRESS: &str = "/run/berth/berth.sock";
/// containerd accepts 16 MiB messages both ways (tonic's own default is 4 MiB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 << 20;

/// containerd's default timeouts (`ctr`-visible behaviour depends on some of them);
/// `config default` prints them and [`Config::timeout`] falls back to them.
pub const DEFAULT_TIMEOUTS: &[(&str, &str)] = &[
    ("io.containerd.timeout.bolt.open", "0s"),
    ("io.containerd.timeout.shim.cleanup", "5s"),
    ("io.containerd.timeout.shim.load", "5s"),
    ("io.containerd.timeout.shim.shutdown", "3s"),
    ("io.containerd.timeout.task.state", "2s"),
];

/// The daemon's configuration (containerd's `services/server/config.Config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    pub version: i64,
    pub root: String,
    pub state: String,
    pub temp: String,
    pub plugin_dir: String,
    pub disabled_plugins: Vec<String>,
    pub required_plugins: Vec<String>,
    pub oom_score: i32,
    pub imports: Vec<String>,
    pub grpc: GrpcConfig,
    pub ttrpc: TtrpcConfig,
    pub debug: DebugConfig,
    pub metrics: MetricsConfig,
    pub cgroup: CgroupConfig,
    pub timeouts: BTreeMap<String, String>,
    pub proxy_plugins: BTreeMap<String, ProxyPlugin>,
    pub stream_processors: BTreeMap<String, StreamProcessor>,
    /// `[plugins."<uri>"]` sections, kept as tables: each plugin decodes its own.
    pub plugins: BTreeMap<String, toml::Table>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            version: 2,
            root: DEFAULT_ROOT.into(),
            state: DEFAULT_STATE.into(),
            temp: String::new(),
            plugin_dir: String::new(),
            disabled_plugins: Vec::new(),
            required_plugins: Vec::new(),
            oom_score: 0,
            imports: Vec::new(),
            grpc: GrpcConfig::default(),
            ttrpc: TtrpcConfig::default(),
            debug: DebugConfig::default(),
            metrics: MetricsConfig::default(),
            cgroup: CgroupConfig::default(),
            timeouts: BTreeMap::new(),
            proxy_plugins: BTreeMap::new(),
            stream_processors: BTreeMap::new(),
            plugins: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpcConfig {
    pub address: String,
    pub tcp_address: String,
    pub tcp_tls_ca: String,
    pub tcp_tls_cert: String,
    pub tcp_tls_key: String,
    pub uid: u32,
    pub gid: u32,
    pub max_recv_message_size: usize,
    pub max_send_message_size: usize,
}

impl Default for GrpcConfig {
    fn default() -> Self {
        GrpcConfig {
            address: DEFAULT_GRPC_ADDRESS.into(),
            tcp_address: String::new(),
            tcp_tls_ca: String::new(),
            tcp_tls_cert: String::new(),
            tcp_tls_key: String::new(),
            uid: 0,
            gid: 0,
            max_recv_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            max_send_message_size: DEFAULT_MAX_MESSAGE_SIZE,
        }
    }
}

/// The ttrpc socket; an empty address means `<grpc address>.ttrpc` with the gRPC
/// socket's owner (containerd's rule).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TtrpcConfig {
    pub address: String,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DebugConfig {
    pub address: String,
    pub uid: u32,
    pub gid: u32,
    pub level: String,
    /// `text` (the default) or `json`.
    pub format: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsConfig {
    pub address: String,
    pub grpc_histogram: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CgroupConfig {
    pub path: String,
}

/// A plugin served by another process over gRPC (`[proxy_plugins.<name>]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxyPlugin {
    /// `snapshot`, `content` or `diff`.
    pub r#type: String,
    pub address: String,
    pub platform: String,
    pub exports: BTreeMap<String, String>,
    pub capabilities: Vec<String>,
}

/// An external binary that converts a layer media type (`[stream_processors."<id>"]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamProcessor {
    pub accepts: Vec<String>,
    pub returns: String,
    pub path: String,
    pub args: Vec<String>,
    pub env: Vec<String>,
}

/// Why a config could not be used; the message names the file (and line and key where
/// the problem is in the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    fn new(message: impl Into<String>) -> Self {
        ConfigError(message.into())
    }

    pub fn from_message(message: impl Into<String>) -> Self {
        ConfigError(message.into())
    }
}

/// A config with where it came from and what was odd about it.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    /// Every file read, the main one first.
    pub files: Vec<PathBuf>,
    /// Unknown keys, version 1 mappings and the like; logged once logging is set up
    /// (the log level itself comes from the config).
    pub warnings: Vec<String>,
}

/// containerd's short plugin IDs (version 1 configs) with their version 2 URIs, for the
/// plugins containerd 1.6 ships; the IDs of Berth's registered plugins are added by the
/// caller (see [`Config::load`]).
pub const CONTAINERD_PLUGIN_IDS: &[(&str, &str)] = &[
    ("aufs", "io.containerd.snapshotter.v1.aufs"),
    ("bolt", "io.containerd.metadata.v1.bolt"),
    ("btrfs", "io.containerd.snapshotter.v1.btrfs"),
    ("cgroups", "io.containerd.monitor.v1.cgroups"),
    ("cri", "io.containerd.grpc.v1.cri"),
    ("devmapper", "io.containerd.snapshotter.v1.devmapper"),
    ("diff-service", "io.containerd.service.v1.diff-service"),
    ("linux", "io.containerd.runtime.v1.linux"),
    ("native", "io.containerd.snapshotter.v1.native"),
    ("opt", "io.containerd.internal.v1.opt"),
    ("overlayfs", "io.containerd.snapshotter.v1.overlayfs"),
    ("restart", "io.containerd.internal.v1.restart"),
    ("scheduler", "io.containerd.gc.v1.scheduler"),
    ("task", "io.containerd.runtime.v2.task"),
    ("walking", "io.containerd.differ.v1.walking"),
    ("zfs", "io.containerd.snapshotter.v1.zfs"),
];

impl Config {
    /// Loads `path` and its imports over the embedded defaults. `plugin_ids` maps the
    /// short IDs of registered plugins to their URIs (used for version 1 files; it may
    /// be empty).
    pub fn load(path: &Path, plugin_ids: &BTreeMap<String, String>) -> Result<Loaded, ConfigError> {
        let mut ids: BTreeMap<String, String> = CONTAINERD_PLUGIN_IDS
            .iter()
            .map(|(id, uri)| (id.to_string(), uri.to_string()))
            .collect();
        ids.extend(plugin_ids.iter().map(|(k, v)| (k.clone(), v.clone())));

        let mut merged = Config::default().to_table();
        let mut warnings = Vec::new();
        let mut files: Vec<PathBuf> = Vec::new();
        let mut seen = HashSet::new();
        let mut pending = std::collections::VecDeque::from([path.to_path_buf()]);
        let mut imported = Vec::new();
        while let Some(file) = pending.pop_front() {
            let key = file.canonicalize().unwrap_or_else(|_| file.clone());
            if !seen.insert(key) {
                continue;
            }
            let table = load_file(&file, &ids, &mut warnings)?;
            let imports = resolve_imports(&file, &table)?;
            merge_file(&mut merged, table);
            // The effective config lists what was imported, not the raw patterns.
            if !files.is_empty() {
                imported.push(file.display().to_string());
            }
            files.push(file);
            pending.extend(imports);
        }
        merged.insert(
            "imports".into(),
            toml::Value::Array(imported.into_iter().map(toml::Value::String).collect()),
        );
        merged.insert("version".into(), toml::Value::Integer(2));
        let config: Config = toml::Value::Table(merged).try_into().map_err(|e| {
            ConfigError::new(format!(
                "failed to merge config {} with its imports: {e}",
                path.display()
            ))
        })?;
        config.validate()?;
        Ok(Loaded {
            config,
            files,
            warnings,
        })
    }

    /// Parses one config text (no imports are followed); for tests and tools.
    pub fn parse(text: &str, name: &str) -> Result<(Config, Vec<String>), ConfigError> {
        let mut warnings = Vec::new();
        let ids = CONTAINERD_PLUGIN_IDS
            .iter()
            .map(|(id, uri)| (id.to_string(), uri.to_string()))
            .collect();
        let table = parse_text(text, Path::new(name), &ids, &mut warnings)?;
        let mut merged = Config::default().to_table();
        merge_file(&mut merged, table);
        merged.insert("version".into(), toml::Value::Integer(2));
        let config: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e| ConfigError::new(format!("{name}: {e}")))?;
        config.validate()?;
        Ok((config, warnings))
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.grpc.address.is_empty() {
            return Err(ConfigError::new(
                "grpc address cannot be empty: invalid argument",
            ));
        }
        if !self.debug.level.is_empty() {
            log_level(&self.debug.level)?;
        }
        if !matches!(self.debug.format.as_str(), "" | "text" | "json") {
            return Err(ConfigError::new(format!(
                "unknown log format {:?} in [debug] format (expected \"text\" or \"json\")",
                self.debug.format
            )));
        }
        for (key, value) in &self.timeouts {
            if parse_duration(value).is_none() {
                return Err(ConfigError::new(format!(
                    "timeout {key:?} has an invalid duration {value:?} (expected e.g. \"5s\", \"100ms\", \"1m30s\")"
                )));
            }
        }
        Ok(())
    }

    /// The config as a TOML table (what `config default`/`dump` print).
    pub fn to_table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("the config serialises to a TOML table")
    }

    /// The TOML text of this config; it parses back to the same config.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("the config serialises to TOML")
    }

    /// The ttrpc socket path (containerd's default: next to the gRPC socket).
    pub fn ttrpc_address(&self) -> String {
        if self.ttrpc.address.is_empty() {
            format!("{}.ttrpc", self.grpc.address)
        } else {
            self.ttrpc.address.clone()
        }
    }

    /// The owner of the ttrpc socket: the gRPC socket's when the address is derived.
    pub fn ttrpc_owner(&self) -> (u32, u32) {
        if self.ttrpc.address.is_empty() {
            (self.grpc.uid, self.grpc.gid)
        } else {
            (self.ttrpc.uid, self.ttrpc.gid)
        }
    }

    /// The config with every plugin's default section overlaid by the file's keys and
    /// containerd's default timeouts filled in: what `config default`/`dump` print.
    pub fn with_plugin_defaults<I>(&self, defaults: I) -> Config
    where
        I: IntoIterator<Item = (String, toml::Table)>,
    {
        let mut config = self.clone();
        for (uri, mut section) in defaults {
            if section.is_empty() && !config.plugins.contains_key(&uri) {
                continue;
            }
            if let Some(from_file) = config.plugins.get(&uri) {
                berth_plugin::merge_tables(&mut section, from_file);
            }
            config.plugins.insert(uri, section);
        }
        config.fill_default_timeouts();
        config.version = 2;
        config
    }

    /// A `[timeouts]` entry, or containerd's default for it.
    pub fn timeout(&self, key: &str) -> Option<Duration> {
        let value = self.timeouts.get(key).map(String::as_str).or_else(|| {
            DEFAULT_TIMEOUTS
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| *v)
        })?;
        parse_duration(value)
    }

    /// Adds containerd's default timeouts that are not set (what `config default` shows).
    pub fn fill_default_timeouts(&mut self) {
        for (key, value) in DEFAULT_TIMEOUTS {
            self.timeouts
                .entry(key.to_string())
                .or_insert_with(|| value.to_string());
        }
    }
}

/// The `tracing` level for containerd's level names (`fatal` and `panic` log as errors).
pub fn log_level(level: &str) -> Result<tracing::Level, ConfigError> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "info" => tracing::Level::INFO,
        "warn" | "warning" => tracing::Level::WARN,
        "error" | "fatal" | "panic" => tracing::Level::ERROR,
        _ => {
            return Err(ConfigError::new(format!(
                "not a valid log level {level:?} (expected trace, debug, info, warn, error, fatal or panic)"
            )));
        }
    })
}

/// Go's `time.ParseDuration` subset containerd's configs use: a sequence of decimal
/// numbers with units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h` (`"0"` alone is allowed).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() || text.starts_with('-') {
        return None;
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return None;
        }
        let number: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * seconds;
    }
    Some(Duration::from_secs_f64(total))
}

/// Reads, checks and normalises one file into a version 2 table.
fn load_file(
    path: &Path,
    ids: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(format!(
            "failed to read config file {}: {e}",
            path.display()
        ))
    })?;
    parse_text(&text, path, ids, warnings)
}

fn parse_text(
    text: &str,
    path: &Path,
    ids: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) -> Result<toml::Table, ConfigError> {
    let mut table: toml::Table = toml::from_str(text).map_err(|e| located_error(path, text, &e))?;

    // Decode the file on its own: wrong types are reported with their place in this
    // file, unknown keys become warnings.
    let mut unknown = Vec::new();
    let mut note_unknown = |key: serde_ignored::Path<'_>| unknown.push(key.to_string());
    let deserializer =
        serde_ignored::Deserializer::new(toml::Deserializer::new(text), &mut note_unknown);
    let result: Result<Config, _> = serde_path_to_error::deserialize(deserializer);
    if let Err(err) = result {
        let key = err.path().to_string();
        return Err(typed_error(path, text, &key, err.inner()));
    }
    for key in unknown {
        warnings.push(format!("{}: unknown key {key:?} ignored", path.display()));
    }

    let version = match table.get("version") {
        None => 1,
        Some(toml::Value::Integer(v)) => *v,
        Some(_) => unreachable!("checked by the typed decode"),
    };
    match version {
        1 => {
            warnings.push(format!(
                "{}: config version 1 is deprecated; its plugin IDs were mapped to version 2 URIs (set `version = 2` and use [plugins.\"<uri>\"] sections)",
                path.display()
            ));
            map_version1(&mut table, path, ids, warnings);
        }
        2 => map_short_plugin_keys(&mut table, path, ids, warnings),
        other => {
            return Err(ConfigError::new(format!(
                "{}: config version {other} is not supported (berthd reads containerd's versions 1 and 2)",
                path.display()
            )));
        }
    }
    table.remove("version");
    Ok(table)
}

/// A syntax error with the file, line, column and the key on that line.
fn located_error(path: &Path, text: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim();
    match err.span() {
        Some(span) => {
            let (line, column) = line_column(text, span.start);
            let key = key_on_line(text, line)
                .map(|k| format!(" (key {k:?})"))
                .unwrap_or_default();
            ConfigError::new(format!(
                "failed to parse config file {}: line {line}, column {column}{key}: {message}",
                path.display()
            ))
        }
        None => ConfigError::new(format!(
            "failed to parse config file {}: {message}",
            path.display()
        )),
    }
}

/// A value of the wrong type, with its key path and place.
fn typed_error(path: &Path, text: &str, key: &str, err: &toml::de::Error) -> ConfigError {
    let message = err.message().trim();
    let place = err
        .span()
        .map(|span| {
            let (line, column) = line_column(text, span.start);
            format!(" line {line}, column {column},")
        })
        .unwrap_or_default();
    ConfigError::new(format!(
        "invalid config file {}:{place} key {key:?}: {message}",
        path.display()
    ))
}

/// The CRI plugin, whose section may hold the deprecated registry keys.
pub const CRI_PLUGIN: &str = "io.containerd.grpc.v1.cri";
/// Where [`Config::convert_cri_registry`] writes the hosts directory, under `state`.
pub const CRI_HOSTS_DIR: &str = "io.containerd.grpc.v1.cri/hosts";

impl Config {
    /// Converts the CRI plugin's deprecated `registry.mirrors` and `registry.configs.<h>.tls`
    /// into a `hosts.toml` directory (`{state}/io.containerd.grpc.v1.cri/hosts/<host>/
    /// hosts.toml`, rewritten at every start since `state` is volatile) and points
    /// `registry.config_path` at it, so the CRI image service and the daemon-side pull
    /// need to know one form only. The converted keys leave the section;
    /// `configs.<h>.auth` stays (it is not deprecated next to `config_path`). Returns a
    /// warning per converted key naming where it went.
    ///
    /// As containerd's CRI plugin, the deprecated keys and `config_path` together are an
    /// error: which one should win is not knowable.
    pub fn convert_cri_registry(&mut self) -> Result<Vec<String>, ConfigError> {
        let state = PathBuf::from(&self.state);
        let Some(registry) = self
            .plugins
            .get_mut(CRI_PLUGIN)
            .and_then(|cri| cri.get_mut("registry"))
            .and_then(|r| r.as_table_mut())
        else {
            return Ok(Vec::new());
        };
        let key = |k: &str| format!("plugins.{CRI_PLUGIN:?}.registry.{k}");
        let has_mirrors = registry
            .get("mirrors")
            .and_then(|m| m.as_table())
            .is_some_and(|m| !m.is_empty());
        let tls_hosts: Vec<String> = registry
            .get("configs")
            .and_then(|c| c.as_table())
            .map(|c| {
                c.iter()
                    .filter(|(_, v)| v.get("tls").is_some())
                    .map(|(h, _)| h.clone())
                    .collect()
            })
            .unwrap_or_default();
        if !has_mirrors && tls_hosts.is_empty() {
            return Ok(Vec::new());
        }
        let config_path = registry
            .get("config_path")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if !config_path.is_empty() {
            let what = if has_mirrors {
                "mirrors"
            } else {
                "configs.tls"
            };
            return Err(ConfigError::new(format!(
                "{}: `{what}` cannot be set when `config_path` is provided",
                key(what)
            )));
        }
        let converted = berth_remotes::hosts::convert_cri_registry(registry)
            .map_err(|e| ConfigError::new(format!("{}: {e}", key("mirrors"))))?;
        let dir = state.join(CRI_HOSTS_DIR);
        let written = (|| -> std::io::Result<()> {
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            for (host, text) in &converted.hosts_toml {
                let host_dir = dir.join(host);
                std::fs::create_dir_all(&host_dir)?;
                std::fs::write(host_dir.join("hosts.toml"), text)?;
            }
            std::fs::create_dir_all(&dir)
        })();
        written.map_err(|e| {
            ConfigError::new(format!(
                "writing the hosts directory {} converted from {}: {e}",
                dir.display(),
                key("mirrors")
            ))
        })?;
        let mut warnings = converted.warnings;
        for host in converted.hosts_toml.keys() {
            let registry = if host == "_default" { "*" } else { host };
            warnings.push(format!(
                "{} for {registry:?} converted to {} (config_path now points to {})",
                key("mirrors/configs"),
                dir.join(host).join("hosts.toml").display(),
                dir.display()
            ));
        }
        registry.remove("mirrors");
        if let Some(configs) = registry.get_mut("configs").and_then(|c| c.as_table_mut()) {
            for host in &tls_hosts {
                if let Some(c) = configs.get_mut(host).and_then(|c| c.as_table_mut()) {
                    c.remove("tls");
                    if c.is_empty() {
                        configs.remove(host);
                    }
                }
            }
            if configs.is_empty() {
                registry.remove("configs");
            }
        }
        registry.insert(
            "config_path".into(),
            toml::Value::String(dir.display().to_string()),
        );
        Ok(warnings)
    }
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The key assigned on a 1-based line (`key = …`), or the table header there.
fn key_on_line(text: &str, line: usize) -> Option<String> {
    let content = text.lines().nth(line - 1)?.trim();
    if content.starts_with('[') {
        return Some(content.trim_matches(['[', ']']).trim().to_string());
    }
    let (key, _) = content.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()).then(|| key.to_string())
}

/// Version 1 names plugins by ID; map each known ID to its URI.
fn map_version1(
    table: &mut toml::Table,
    path: &Path,
    ids: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) {
    map_short_plugin_keys(table, path, ids, warnings);
    for list in ["disabled_plugins", "required_plugins"] {
        if let Some(toml::Value::Array(items)) = table.get_mut(list) {
            for item in items.iter_mut() {
                if let toml::Value::String(id) = item
                    && let Some(uri) = ids.get(id.as_str())
                {
                    *id = uri.clone();
                }
            }
        }
    }
}

/// Plugin sections keyed by a short ID (`[plugins.cri]`) are moved to their URI when the
/// ID is known; otherwise they stay and a warning says so.
fn map_short_plugin_keys(
    table: &mut toml::Table,
    path: &Path,
    ids: &BTreeMap<String, String>,
    warnings: &mut Vec<String>,
) {
    let Some(toml::Value::Table(plugins)) = table.get_mut("plugins") else {
        return;
    };
    let short: Vec<String> = plugins
        .keys()
        .filter(|k| k.split('.').count() < 4)
        .cloned()
        .collect();
    for id in short {
        let section = plugins.remove(&id).expect("key listed above");
        match ids.get(&id) {
            Some(uri) => {
                let mut merged = match plugins.remove(uri) {
                    Some(toml::Value::Table(t)) => t,
                    _ => toml::Table::new(),
                };
                if let toml::Value::Table(section) = &section {
                    berth_plugin::merge_tables(&mut merged, section);
                }
                plugins.insert(uri.clone(), toml::Value::Table(merged));
            }
            None => {
                warnings.push(format!(
                    "{}: plugin section {id:?} names no known plugin (expected a URI like \"io.containerd.grpc.v1.cri\"); kept but unused",
                    path.display()
                ));
                plugins.insert(id, section);
            }
        }
    }
}

/// The files a config's `imports` name: globs and relative paths are resolved against
/// the importing file's directory; glob matches come in name order.
fn resolve_imports(parent: &Path, table: &toml::Table) -> Result<Vec<PathBuf>, ConfigError> {
    let Some(toml::Value::Array(imports)) = table.get("imports") else {
        return Ok(Vec::new());
    };
    let base = parent.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for import in imports {
        let toml::Value::String(pattern) = import else {
            continue;
        };
        let full = if Path::new(pattern).is_absolute() {
            PathBuf::from(pattern)
        } else {
            base.join(pattern)
        };
        if pattern.contains(['*', '?', '[']) {
            let text = full.to_string_lossy();
            let matches = glob::glob(&text).map_err(|e| {
                ConfigError::new(format!(
                    "{}: invalid import pattern {pattern:?}: {e}",
                    parent.display()
                ))
            })?;
            let mut matched: Vec<PathBuf> = matches.filter_map(|m| m.ok()).collect();
            matched.sort();
            out.extend(matched);
        } else {
            out.push(full);
        }
    }
    Ok(out)
}

/// Overlays one file's table onto the accumulated one (rules in the module docs).
fn merge_file(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (key.as_str(), into.get_mut(&key), value) {
            (
                "disabled_plugins" | "required_plugins" | "imports",
                Some(toml::Value::Array(existing)),
                toml::Value::Array(items),
            ) => {
                for item in items {
                    if !existing.contains(&item) {
                        existing.push(item);
                    }
                }
            }
            ("plugins", Some(toml::Value::Table(existing)), toml::Value::Table(sections)) => {
                berth_plugin::merge_tables(existing, &sections);
            }
            (_, Some(toml::Value::Table(existing)), toml::Value::Table(entries)) => {
                // proxy_plugins, stream_processors and timeouts entries, and the keys of
                // [grpc], [debug], …: each replaces what was there.
                for (k, v) in entries {
                    existing.insert(k, v);
                }
            }
            (_, _, value) => {
                into.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tests/fixtures/configs/cri-config.toml` with its `config_path` line replaced.
    fn cri_fixture(registry: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/configs/cri-config.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let line = "    config_path = \"/etc/containerd/certs.d\"\n";
        assert!(text.contains(line), "the fixture changed");
        text.replace(line, registry)
    }

    fn registry_section(config: &Config) -> &toml::Table {
        config.plugins[CRI_PLUGIN]["registry"].as_table().unwrap()
    }

    #[test]
    fn cri_fixture_with_config_path_is_left_alone() {
        let state = tempfile::tempdir().unwrap();
        let (mut config, warnings) = Config::parse(
            &cri_fixture("    config_path = \"/etc/containerd/certs.d\"\n"),
            "cri-config.toml",
        )
        .unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        config.state = state.path().display().to_string();
        assert!(config.convert_cri_registry().unwrap().is_empty());
        assert_eq!(
            registry_section(&config)["config_path"].as_str(),
            Some("/etc/containerd/certs.d")
        );
        assert!(!state.path().join(CRI_HOSTS_DIR).exists());
    }

    #[test]
    fn deprecated_cri_registry_keys_become_a_hosts_directory() {
        let state = tempfile::tempdir().unwrap();
        let registry = r#"    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example:5000"]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."registry.local:5000"]
      endpoint = ["http://registry.local:5000"]
    [plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.example:5000".tls]
      insecure_skip_verify = true
    [plugins."io.containerd.grpc.v1.cri".registry.configs."docker.io".auth]
      username = "u"
      password = "p"
"#;
        let (mut config, _) = Config::parse(&cri_fixture(registry), "cri-config.toml").unwrap();
        config.state = state.path().display().to_string();
        // A stale file from an earlier start goes.
        let dir = state.path().join(CRI_HOSTS_DIR);
        std::fs::create_dir_all(dir.join("stale.example")).unwrap();
        let warnings = config.convert_cri_registry().unwrap();
        assert!(
            warnings.iter().any(|w| w.contains("\"docker.io\"")
                && w.contains(&dir.join("docker.io/hosts.toml").display().to_string())),
            "{warnings:?}"
        );
        assert!(
            warnings.iter().any(|w| w.contains("deprecated")),
            "{warnings:?}"
        );
        assert!(!dir.join("stale.example").exists());
        let section = registry_section(&config);
        assert_eq!(
            section["config_path"].as_str(),
            Some(dir.display().to_string().as_str())
        );
        assert!(!section.contains_key("mirrors"));
        // Credentials stay for the CRI plugin; the TLS settings moved to hosts.toml.
        assert_eq!(
            section["configs"]["docker.io"]["auth"]["username"].as_str(),
            Some("u")
        );
        assert!(section["configs"].get("mirror.example:5000").is_none());
        let text = std::fs::read_to_string(dir.join("docker.io/hosts.toml")).unwrap();
        let hosts = berth_remotes::hosts::parse_hosts_file(&dir.join("docker.io"), &text).unwrap();
        assert_eq!(hosts[0].base_url(), "https://mirror.example:5000/v2");
        assert_eq!(hosts[0].tls.skip_verify, Some(true));
        assert_eq!(hosts[1].base_url(), "https://registry-1.docker.io/v2");
        assert!(dir.join("registry.local:5000/hosts.toml").is_file());
        // The result is a config like any other: it dumps and parses again.
        let (again, warnings) = Config::parse(&config.to_toml(), "dump").unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            registry_section(&again)["config_path"],
            section["config_path"]
        );
    }

    #[test]
    fn deprecated_cri_registry_keys_conflict_with_config_path() {
        let registry = r#"    config_path = "/etc/containerd/certs.d"
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example"]
"#;
        let (mut config, _) = Config::parse(&cri_fixture(registry), "cri-config.toml").unwrap();
        let state = tempfile::tempdir().unwrap();
        config.state = state.path().display().to_string();
        let err = config.convert_cri_registry().unwrap_err();
        assert!(
            err.to_string()
                .contains("`mirrors` cannot be set when `config_path` is provided"),
            "{err}"
        );
        assert!(!state.path().join(CRI_HOSTS_DIR).exists());
    }

    #[test]
    fn defaults_are_berths_own_paths() {
        let config = Config::default();
        assert_eq!(config.root, "/var/lib/berth");
        assert_eq!(config.state, "/run/berth");
        assert_eq!(config.grpc.address, "/run/berth/berth.sock");
        assert_eq!(config.ttrpc_address(), "/run/berth/berth.sock.ttrpc");
        assert_eq!(config.grpc.max_recv_message_size, 16 << 20);
        assert_eq!(config.grpc.max_send_message_size, 16 << 20);
    }

    #[test]
    fn default_config_round_trips() {
        let mut config = Config::default();
        config.fill_default_timeouts();
        config
            .plugins
            .insert("io.x.v1.y".into(), toml::toml! { a = 1 b = { c = "d" } });
        let text = config.to_toml();
        let (parsed, warnings) = Config::parse(&text, "default").unwrap();
        assert_eq!(parsed, config);
        assert!(warnings.is_empty(), "{warnings:?}");
    }

    #[test]
    fn syntax_errors_name_file_line_and_key() {
        let text = "version = 2\nroot = \"/a\"\noom_score = = 3\n";
        let err = Config::parse(text, "/etc/x.toml").unwrap_err().to_string();
        assert!(err.contains("/etc/x.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("oom_score"), "{err}");
    }

    #[test]
    fn type_errors_name_file_line_and_key() {
        let text = "version = 2\n[grpc]\n  uid = \"root\"\n";
        let err = Config::parse(text, "/etc/x.toml").unwrap_err().to_string();
        assert!(err.contains("/etc/x.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("grpc.uid"), "{err}");
    }

    #[test]
    fn unknown_keys_warn() {
        let text = "version = 2\nfrobnicate = 1\n[grpc]\nspeed = 3\n[plugins.\"io.a.v1.b\"]\nanything = 1\n";
        let (_, warnings) = Config::parse(text, "x.toml").unwrap();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("frobnicate") || warnings[1].contains("frobnicate"));
        assert!(warnings.iter().any(|w| w.contains("grpc.speed")));
    }

    #[test]
    fn version1_plugin_ids_map_to_uris() {
        let text = "disabled_plugins = [\"cri\"]\n[plugins.cri]\nsandbox_image = \"p\"\n[plugins.linux]\nshim = \"s\"\n[plugins.mystery]\nx = 1\n";
        let (config, warnings) = Config::parse(text, "v1.toml").unwrap();
        assert_eq!(
            config.plugins["io.containerd.grpc.v1.cri"]["sandbox_image"].as_str(),
            Some("p")
        );
        assert!(
            config
                .plugins
                .contains_key("io.containerd.runtime.v1.linux")
        );
        assert!(config.plugins.contains_key("mystery"));
        assert_eq!(config.disabled_plugins, ["io.containerd.grpc.v1.cri"]);
        assert!(warnings.iter().any(|w| w.contains("version 1")));
        assert!(warnings.iter().any(|w| w.contains("mystery")));
    }

    #[test]
    fn unsupported_versions_are_refused() {
        let err = Config::parse("version = 3\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("version 3"), "{err}");
    }

    #[test]
    fn imports_overlay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            &main,
            r#"version = 2
imports = ["conf.d/*.toml", "extra.toml"]
oom_score = -500
disabled_plugins = ["io.a.v1.x"]
[grpc]
  uid = 7
  gid = 8
[timeouts]
  "io.containerd.timeout.shim.load" = "9s"
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
  other = 1
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-a.toml"),
            r#"version = 2
oom_score = 0
disabled_plugins = ["io.a.v1.y"]
[grpc]
  gid = 9
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "shared"
"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("conf.d/20-b.toml"),
            "version = 2\nroot = \"/srv/b\"\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("extra.toml"),
            "version = 2\nstate = \"/run/x\"\n",
        )
        .unwrap();

        let loaded = Config::load(&main, &BTreeMap::new()).unwrap();
        let config = loaded.config;
        assert_eq!(loaded.files.len(), 4);
        assert_eq!(config.oom_score, 0, "a later explicit zero wins");
        assert_eq!(config.root, "/srv/b");
        assert_eq!(config.state, "/run/x");
        assert_eq!((config.grpc.uid, config.grpc.gid), (7, 9));
        assert_eq!(config.disabled_plugins, ["io.a.v1.x", "io.a.v1.y"]);
        let bolt = &config.plugins["io.containerd.metadata.v1.bolt"];
        assert_eq!(bolt["content_sharing_policy"].as_str(), Some("shared"));
        assert_eq!(bolt["other"].as_integer(), Some(1));
        assert_eq!(
            config.timeout("io.containerd.timeout.shim.load"),
            Some(Duration::from_secs(9))
        );
        assert_eq!(config.imports.len(), 3);
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
    }

    #[test]
    fn missing_import_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let main = dir.path().join("config.toml");
        std::fs::write(&main, "version = 2\nimports = [\"nope.toml\"]\n").unwrap();
        let err = Config::load(&main, &BTreeMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn circular_imports_load_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.toml");
        std::fs::write(&a, "version = 2\nimports = [\"b.toml\"]\n").unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            "version = 2\nimports = [\"a.toml\"]\n",
        )
        .unwrap();
        let loaded = Config::load(&a, &BTreeMap::new()).unwrap();
        assert_eq!(loaded.files.len(), 2);
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(
            parse_duration("4h0m0s"),
            Some(Duration::from_secs(4 * 3600))
        );
        assert_eq!(
            parse_duration("1m30.5s"),
            Some(Duration::from_secs_f64(90.5))
        );
        for bad in ["", "5", "5x", "-1s", "s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_level_and_format_are_refused() {
        assert!(Config::parse("version = 2\n[debug]\nlevel = \"loud\"\n", "x").is_err());
        assert!(Config::parse("version = 2\n[debug]\nformat = \"xml\"\n", "x").is_err());
        assert!(Config::parse("version = 2\n[grpc]\naddress = \"\"\n", "x").is_err());
    }
}
