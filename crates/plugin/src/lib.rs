//! containerd's plugin model: every service is a [`Registration`] with a `Type.ID` URI,
//! the types it `requires`, a default config section and an async `init`.
//!
//! [`PluginSet::initialize`] orders registrations so that required types come first
//! (containerd's graph walk, `*` meaning every other plugin), runs each `init` with an
//! [`InitContext`], and records every outcome — loaded, failed with its error, or skipped
//! — so introspection can show it. A failure never aborts the daemon unless the plugin is
//! in `required_plugins`.

use berth_core::{Error, Result};
use futures::future::BoxFuture;
use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

/// Plugin types, as containerd names them.
pub mod types {
    pub const CONTENT: &str = "io.containerd.content.v1";
    pub const SNAPSHOT: &str = "io.containerd.snapshotter.v1";
    pub const METADATA: &str = "io.containerd.metadata.v1";
    pub const GC: &str = "io.containerd.gc.v1";
    pub const DIFF: &str = "io.containerd.differ.v1";
    pub const EVENT: &str = "io.containerd.event.v1";
    pub const LEASE: &str = "io.containerd.lease.v1";
    pub const SERVICE: &str = "io.containerd.service.v1";
    pub const GRPC: &str = "io.containerd.grpc.v1";
    pub const TTRPC: &str = "io.containerd.ttrpc.v1";
    pub const INTERNAL: &str = "io.containerd.internal.v1";
    pub const RUNTIME_V2: &str = "io.containerd.runtime.v2";
    pub const MONITOR: &str = "io.containerd.monitor.v1";
    pub const OPT: &str = "io.containerd.opt.v1";
    pub const TRANSFER: &str = "io.containerd.transfer.v1";
    pub const STREAMING: &str = "io.containerd.streaming.v1";
}

/// A loaded plugin's value, shared with the plugins that require it. Each plugin type
/// documents the concrete type it stores (usually an `Arc<dyn Trait>`).
pub type Instance = Arc<dyn Any + Send + Sync>;

/// The future an `init` function returns.
pub type InitFuture = BoxFuture<'static, Result<Instance>>;

type InitFn = Box<dyn Fn(InitContext) -> InitFuture + Send + Sync>;

/// One plugin, as a crate registers it.
pub struct Registration {
    pub r#type: &'static str,
    pub id: &'static str,
    pub requires: Vec<&'static str>,
    /// The plugin's default `[plugins."<uri>"]` section (what `config default` prints).
    pub default_config: toml::Table,
    init: InitFn,
}

impl Registration {
    pub fn new<F, Fut>(r#type: &'static str, id: &'static str, init: F) -> Self
    where
        F: Fn(InitContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Instance>> + Send + 'static,
    {
        Registration {
            r#type,
            id,
            requires: Vec::new(),
            default_config: toml::Table::new(),
            init: Box::new(move |ctx| Box::pin(init(ctx))),
        }
    }

    pub fn requires(mut self, types: &[&'static str]) -> Self {
        self.requires.extend_from_slice(types);
        self
    }

    /// Declares the config section from a typed default (serialised to TOML).
    pub fn with_config<C: serde::Serialize + Default>(mut self) -> Self {
        self.default_config = toml::Table::try_from(C::default())
            .expect("plugin default config serialises to a TOML table");
        self
    }

    pub fn uri(&self) -> String {
        format!("{}.{}", self.r#type, self.id)
    }
}

/// Settings of the daemon that every plugin may read.
#[derive(Debug, Clone, Default)]
pub struct DaemonInfo {
    pub root: PathBuf,
    pub state: PathBuf,
    pub grpc_address: String,
    pub ttrpc_address: String,
    /// Platforms this daemon runs, in containerd's `os/arch[/variant]` form.
    pub platforms: Vec<String>,
    /// `[grpc] max_recv_message_size` / `max_send_message_size` (0 = containerd's
    /// default); services get them as [`MessageLimits`] when they register.
    pub max_recv_message_size: usize,
    pub max_send_message_size: usize,
}

/// What `init` gets: its directories, its config section, and access to the plugins
/// initialised before it.
pub struct InitContext {
    pub r#type: &'static str,
    pub id: &'static str,
    /// `{root}/{uri}`: the plugin's persistent directory (created on demand by the plugin).
    pub root: PathBuf,
    /// `{state}/{uri}`: the plugin's volatile directory.
    pub state: PathBuf,
    pub daemon: Arc<DaemonInfo>,
    /// The effective config section: defaults overlaid with the file's keys.
    pub config: toml::Table,
    pub events: berth_core::events::Exchange,
    loaded: Arc<LoadedPlugins>,
    meta: Arc<std::sync::Mutex<PluginMeta>>,
    records: PluginRecords,
}

/// A live view of every plugin's record; complete once initialisation has finished, which
/// is before any request is served (introspection reads it).
#[derive(Clone, Default)]
pub struct PluginRecords(Arc<std::sync::RwLock<Vec<PluginRecord>>>);

impl PluginRecords {
    pub fn snapshot(&self) -> Vec<PluginRecord> {
        self.0.read().unwrap().clone()
    }
    fn push(&self, record: PluginRecord) {
        self.0.write().unwrap().push(record);
    }
}

impl InitContext {
    /// The records of all plugins (see [`PluginRecords`]).
    pub fn plugin_records(&self) -> PluginRecords {
        self.records.clone()
    }

    /// Deserialises the config section; unknown keys are logged, not fatal.
    pub fn config<C: serde::de::DeserializeOwned>(&self) -> Result<C> {
        let uri = format!("{}.{}", self.r#type, self.id);
        let value = toml::Value::Table(self.config.clone());
        serde_ignored::deserialize(value, |path| {
            tracing::warn!(plugin = %uri, key = %path, "unknown config key ignored");
        })
        .map_err(|e| Error::invalid_argument(format!("config of plugin {uri}: {e}")))
    }

    /// The single loaded plugin of `type` (the first one if several loaded).
    pub fn get<T: Clone + 'static>(&self, r#type: &str) -> Result<T> {
        let (uri, instance) = self.loaded.first_of_type(r#type)?;
        downcast(&uri, &instance)
    }

    /// The loaded plugin `type.id`.
    pub fn get_by_id<T: Clone + 'static>(&self, r#type: &str, id: &str) -> Result<T> {
        let uri = format!("{type}.{id}");
        let instance = self.loaded.by_uri(&uri)?;
        downcast(&uri, &instance)
    }

    /// Every loaded plugin of `type`, by ID (failed ones are left out).
    pub fn get_all<T: Clone + 'static>(&self, r#type: &str) -> BTreeMap<String, T> {
        self.loaded
            .of_type(r#type)
            .into_iter()
            .filter_map(|(id, instance)| instance.downcast_ref::<T>().cloned().map(|t| (id, t)))
            .collect()
    }

    /// Adds an export shown by introspection (e.g. a snapshotter's root).
    pub fn export(&self, key: &str, value: impl Into<String>) {
        self.meta
            .lock()
            .unwrap()
            .exports
            .insert(key.to_string(), value.into());
    }

    /// Adds a capability shown by introspection.
    pub fn capability(&self, capability: impl Into<String>) {
        self.meta
            .lock()
            .unwrap()
            .capabilities
            .push(capability.into());
    }

    /// Sets the platforms this plugin supports (shown by introspection).
    pub fn platforms(&self, platforms: Vec<String>) {
        self.meta.lock().unwrap().platforms = platforms;
    }
}

fn downcast<T: Clone + 'static>(uri: &str, instance: &Instance) -> Result<T> {
    instance.downcast_ref::<T>().cloned().ok_or_else(|| {
        Error::unknown(format!(
            "plugin {uri} does not provide {}",
            std::any::type_name::<T>()
        ))
    })
}

#[derive(Debug, Clone, Default)]
struct PluginMeta {
    exports: BTreeMap<String, String>,
    capabilities: Vec<String>,
    platforms: Vec<String>,
}

/// The outcome of one plugin's init.
#[derive(Debug, Clone)]
pub enum Status {
    Loaded,
    /// `init` returned an error (or a required plugin was unavailable).
    Failed(Error),
    /// `init` reported that the plugin does not apply here (containerd's `ErrSkipPlugin`).
    Skipped(String),
}

/// What introspection reports about one plugin.
#[derive(Debug, Clone)]
pub struct PluginRecord {
    pub r#type: String,
    pub id: String,
    pub requires: Vec<String>,
    pub platforms: Vec<String>,
    pub exports: BTreeMap<String, String>,
    pub capabilities: Vec<String>,
    pub status: Status,
}

impl PluginRecord {
    pub fn uri(&self) -> String {
        format!("{}.{}", self.r#type, self.id)
    }
}

/// Returned by an `init` to mean "not applicable on this host" rather than "broken".
pub fn skip(reason: impl Into<String>) -> Error {
    Error::with_message(
        berth_core::error::ErrorKind::FailedPrecondition,
        format!("skip plugin: {}", reason.into()),
    )
}

fn is_skip(err: &Error) -> bool {
    err.message().starts_with("skip plugin: ")
}

#[derive(Default)]
struct LoadedPlugins {
    /// In init order: (type, id, instance).
    plugins: std::sync::RwLock<Vec<(String, String, Instance)>>,
    failures: std::sync::RwLock<HashMap<String, String>>,
}

impl LoadedPlugins {
    fn first_of_type(&self, r#type: &str) -> Result<(String, Instance)> {
        let plugins = self.plugins.read().unwrap();
        if let Some((t, id, instance)) = plugins.iter().find(|(t, _, _)| t == r#type) {
            return Ok((format!("{t}.{id}"), instance.clone()));
        }
        let failures = self.failures.read().unwrap();
        let failed: Vec<_> = failures
            .iter()
            .filter(|(uri, _)| uri.rsplit_once('.').is_some_and(|(t, _)| t == r#type))
            .map(|(uri, why)| format!("{uri}: {why}"))
            .collect();
        if failed.is_empty() {
            Err(Error::not_found(format!(
                "no plugins registered for {type}"
            )))
        } else {
            Err(Error::unavailable(format!(
                "required plugin failed ({})",
                failed.join("; ")
            )))
        }
    }

    fn by_uri(&self, uri: &str) -> Result<Instance> {
        let plugins = self.plugins.read().unwrap();
        if let Some((_, _, instance)) = plugins.iter().find(|(t, id, _)| format!("{t}.{id}") == uri)
        {
            return Ok(instance.clone());
        }
        match self.failures.read().unwrap().get(uri) {
            Some(why) => Err(Error::unavailable(format!(
                "required plugin {uri} failed: {why}"
            ))),
            None => Err(Error::not_found(format!("plugin {uri}"))),
        }
    }

    fn of_type(&self, r#type: &str) -> Vec<(String, Instance)> {
        let plugins = self.plugins.read().unwrap();
        plugins
            .iter()
            .filter(|(t, _, _)| t == r#type)
            .map(|(_, id, instance)| (id.clone(), instance.clone()))
            .collect()
    }
}

/// The daemon's plugins after initialisation.
pub struct PluginSet {
    loaded: Arc<LoadedPlugins>,
    records: PluginRecords,
}

/// How the daemon wants plugins initialised.
pub struct InitOptions {
    pub daemon: Arc<DaemonInfo>,
    pub events: berth_core::events::Exchange,
    /// `[plugins."<uri>"]` sections from the config file, by URI.
    pub sections: HashMap<String, toml::Table>,
    /// URIs (or containerd's short IDs) in `disabled_plugins`.
    pub disabled: Vec<String>,
    /// URIs in `required_plugins`: a failure of one of these is fatal.
    pub required: Vec<String>,
}

impl PluginSet {
    /// Orders `registrations` (required types first) and initialises them one by one.
    /// Returns an error only when a `required_plugins` entry did not load.
    pub async fn initialize(
        registrations: Vec<Registration>,
        options: InitOptions,
    ) -> Result<PluginSet> {
        let disabled: HashSet<&str> = options.disabled.iter().map(String::as_str).collect();
        let is_disabled =
            |r: &Registration| disabled.contains(r.uri().as_str()) || disabled.contains(r.id);
        let enabled: Vec<&Registration> =
            registrations.iter().filter(|r| !is_disabled(r)).collect();
        let order = init_order(&enabled);

        let loaded = Arc::new(LoadedPlugins::default());
        let records = PluginRecords::default();
        for registration in order {
            let uri = registration.uri();
            let mut config = registration.default_config.clone();
            if let Some(section) = options.sections.get(&uri) {
                merge_tables(&mut config, section);
            }
            let meta = Arc::new(std::sync::Mutex::new(PluginMeta {
                platforms: Vec::new(),
                ..Default::default()
            }));
            let ctx = InitContext {
                r#type: registration.r#type,
                id: registration.id,
                root: options.daemon.root.join(&uri),
                state: options.daemon.state.join(&uri),
                daemon: options.daemon.clone(),
                config,
                events: options.events.clone(),
                loaded: loaded.clone(),
                meta: meta.clone(),
                records: records.clone(),
            };
            let status = match (registration.init)(ctx).await {
                Ok(instance) => {
                    tracing::info!(plugin = %uri, "loaded plugin");
                    loaded.plugins.write().unwrap().push((
                        registration.r#type.to_string(),
                        registration.id.to_string(),
                        instance,
                    ));
                    Status::Loaded
                }
                Err(err) if is_skip(&err) => {
                    tracing::info!(plugin = %uri, reason = %err, "skip loading plugin");
                    loaded
                        .failures
                        .write()
                        .unwrap()
                        .insert(uri.clone(), err.to_string());
                    Status::Skipped(err.to_string())
                }
                Err(err) => {
                    tracing::warn!(plugin = %uri, error = %err, "failed to load plugin");
                    loaded
                        .failures
                        .write()
                        .unwrap()
                        .insert(uri.clone(), err.to_string());
                    Status::Failed(err)
                }
            };
            let meta = meta.lock().unwrap().clone();
            records.push(PluginRecord {
                r#type: registration.r#type.to_string(),
                id: registration.id.to_string(),
                requires: registration
                    .requires
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                platforms: meta.platforms,
                exports: meta.exports,
                capabilities: meta.capabilities,
                status,
            });
        }

        let snapshot = records.snapshot();
        for required in &options.required {
            match snapshot.iter().find(|r| &r.uri() == required) {
                Some(PluginRecord {
                    status: Status::Loaded,
                    ..
                }) => {}
                Some(PluginRecord {
                    status: Status::Failed(e),
                    ..
                }) => {
                    return Err(Error::failed_precondition(format!(
                        "required plugin {required} failed to load: {e}"
                    )));
                }
                Some(PluginRecord {
                    status: Status::Skipped(why),
                    ..
                }) => {
                    return Err(Error::failed_precondition(format!(
                        "required plugin {required} was skipped: {why}"
                    )));
                }
                None => {
                    return Err(Error::failed_precondition(format!(
                        "required plugin {required} is not registered or is disabled"
                    )));
                }
            }
        }
        Ok(PluginSet { loaded, records })
    }

    pub fn records(&self) -> Vec<PluginRecord> {
        self.records.snapshot()
    }

    /// Loaded instances of `type` by ID (e.g. every gRPC service).
    pub fn get_all<T: Clone + 'static>(&self, r#type: &str) -> BTreeMap<String, T> {
        self.loaded
            .of_type(r#type)
            .into_iter()
            .filter_map(|(id, instance)| instance.downcast_ref::<T>().cloned().map(|t| (id, t)))
            .collect()
    }

    /// Loaded instances of `type` in init order, with their IDs.
    pub fn instances(&self, r#type: &str) -> Vec<(String, Instance)> {
        self.loaded.of_type(r#type)
    }
}

/// containerd's graph walk: before each plugin come (recursively) all plugins of the
/// types it requires; `*` requires every other plugin.
fn init_order<'a>(registrations: &[&'a Registration]) -> Vec<&'a Registration> {
    fn visit<'a>(
        registration: &'a Registration,
        all: &[&'a Registration],
        added: &mut HashSet<String>,
        visiting: &mut HashSet<String>,
        order: &mut Vec<&'a Registration>,
    ) {
        let uri = registration.uri();
        if added.contains(&uri) || !visiting.insert(uri.clone()) {
            return;
        }
        for required in &registration.requires {
            for candidate in all {
                if candidate.uri() != uri && (*required == "*" || candidate.r#type == *required) {
                    visit(candidate, all, added, visiting, order);
                }
            }
        }
        visiting.remove(&uri);
        if added.insert(uri) {
            order.push(registration);
        }
    }
    let mut order = Vec::new();
    let mut added = HashSet::new();
    let mut visiting = HashSet::new();
    for registration in registrations {
        visit(
            registration,
            registrations,
            &mut added,
            &mut visiting,
            &mut order,
        );
    }
    order
}

/// Overlays `overlay` onto `base`, recursing into nested tables.
pub fn merge_tables(base: &mut toml::Table, overlay: &toml::Table) {
    for (key, value) in overlay {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(base_table)), toml::Value::Table(overlay_table)) => {
                merge_tables(base_table, overlay_table)
            }
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

/// The largest gRPC messages the daemon accepts and sends (`[grpc]
/// max_recv_message_size` / `max_send_message_size`; containerd's default is 16 MiB,
/// tonic's own 4 MiB). tonic sets them per service, so every service applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageLimits {
    pub max_recv: usize,
    pub max_send: usize,
}

impl MessageLimits {
    /// containerd's default for both directions.
    pub const DEFAULT: usize = 16 << 20;

    /// The limits of `daemon`, with 0 meaning containerd's default.
    pub fn of(daemon: &DaemonInfo) -> MessageLimits {
        let or_default = |size: usize| if size == 0 { Self::DEFAULT } else { size };
        MessageLimits {
            max_recv: or_default(daemon.max_recv_message_size),
            max_send: or_default(daemon.max_send_message_size),
        }
    }
}

/// A gRPC service plugin: adds its tonic services to the daemon's router.
/// Plugins of type [`types::GRPC`] store an `Arc<dyn GrpcService>` as their instance.
pub trait GrpcService: Send + Sync {
    fn register(&self, routes: &mut tonic::service::RoutesBuilder, limits: MessageLimits);
}

/// Wraps a gRPC service for storage as a plugin instance.
pub fn grpc_instance(service: Arc<dyn GrpcService>) -> Instance {
    Arc::new(service)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registration(t: &'static str, id: &'static str, requires: &[&'static str]) -> Registration {
        Registration::new(t, id, |_ctx| async { Ok(Arc::new(()) as Instance) }).requires(requires)
    }

    fn options(disabled: &[&str], required: &[&str]) -> InitOptions {
        InitOptions {
            daemon: Arc::new(DaemonInfo::default()),
            events: berth_core::events::Exchange::new(),
            sections: HashMap::new(),
            disabled: disabled.iter().map(|s| s.to_string()).collect(),
            required: required.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[tokio::test]
    async fn required_types_initialise_first() {
        let regs = vec![
            registration("grpc", "a", &["service"]),
            registration("service", "b", &["metadata"]),
            registration("internal", "all", &["*"]),
            registration("metadata", "c", &[]),
        ];
        let set = PluginSet::initialize(regs, options(&[], &[]))
            .await
            .unwrap();
        let order: Vec<_> = set.records().iter().map(|r| r.uri()).collect();
        assert_eq!(order, ["metadata.c", "service.b", "grpc.a", "internal.all"]);
    }

    #[tokio::test]
    async fn failures_are_recorded_and_dependents_see_them() {
        let regs = vec![
            Registration::new("metadata", "broken", |_ctx| async {
                Err::<Instance, _>(Error::unknown("disk on fire"))
            }),
            Registration::new("service", "user", |ctx: InitContext| async move {
                ctx.get::<()>("metadata")?;
                Ok(Arc::new(()) as Instance)
            })
            .requires(&["metadata"]),
        ];
        let set = PluginSet::initialize(regs, options(&[], &[]))
            .await
            .unwrap();
        let statuses: Vec<_> = set
            .records()
            .iter()
            .map(|r| format!("{:?}", r.status))
            .collect();
        assert!(statuses[0].contains("disk on fire"), "{statuses:?}");
        assert!(
            statuses[1].contains("required plugin failed"),
            "{statuses:?}"
        );
    }

    #[tokio::test]
    async fn disabled_and_required_plugins() {
        let regs = || {
            vec![
                registration("metadata", "a", &[]),
                registration("grpc", "b", &[]),
            ]
        };
        let set = PluginSet::initialize(regs(), options(&["grpc.b"], &[]))
            .await
            .unwrap();
        assert_eq!(set.records().len(), 1);
        let err = PluginSet::initialize(regs(), options(&["grpc.b"], &["grpc.b"])).await;
        assert!(
            err.err()
                .unwrap()
                .to_string()
                .contains("required plugin grpc.b")
        );
        PluginSet::initialize(regs(), options(&[], &["grpc.b"]))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn config_sections_overlay_defaults() {
        #[derive(serde::Serialize, serde::Deserialize, Default)]
        struct Conf {
            a: u32,
            b: String,
        }
        let seen = Arc::new(std::sync::Mutex::new(None));
        let seen2 = seen.clone();
        let reg = Registration::new("t", "x", move |ctx: InitContext| {
            let seen = seen2.clone();
            async move {
                let conf: Conf = ctx.config()?;
                *seen.lock().unwrap() = Some((conf.a, conf.b));
                Ok(Arc::new(()) as Instance)
            }
        })
        .with_config::<Conf>();
        let mut opts = options(&[], &[]);
        opts.sections.insert("t.x".into(), toml::toml! { a = 7 });
        PluginSet::initialize(vec![reg], opts).await.unwrap();
        assert_eq!(*seen.lock().unwrap(), Some((7, String::new())));
    }
}
