//! `io.containerd.internal.v1.restart`: the restart monitor. Every `interval`, containers
//! labelled `containerd.io/restart.status=running` whose task is missing or stopped get a
//! new task (output to `containerd.io/restart.loguri` or `…restart.logpath` if set), and
//! containers labelled `…=stopped` have their task killed and deleted.
//!
//! Restart policies, as containerd's `runtime/restart` package and monitor (1.7):
//! `containerd.io/restart.policy` is `always` (also when absent), `no`,
//! `on-failure[:N]` (only after a non-zero exit, at most N restarts when N is given) or
//! `unless-stopped` (unless `containerd.io/restart.explicitly-stopped=true`, which a
//! client sets when the user stops the container). Each restart first records the new
//! `containerd.io/restart.count` on the container. As in containerd, a task that was
//! deleted leaves no exit status, so `on-failure` does not restart it. Unlike
//! containerd, a created or paused task is left alone (containerd would replace it, which
//! races with a client between its create and start).

use crate::tasks::{TaskCreate, create_task};
use berth_api::any;
use berth_api::containerd::events::ContainerUpdate;
use berth_core::events::{EventPublisher, Exchange};
use berth_core::labels::Labels;
use berth_core::runtime::{IoConfig, Runtime, TaskStatus};
use berth_core::snapshot::Snapshotter;
use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_metadata::containers::Container;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub const STATUS_LABEL: &str = "containerd.io/restart.status";
pub const LOG_URI_LABEL: &str = "containerd.io/restart.loguri";
pub const LOG_PATH_LABEL: &str = "containerd.io/restart.logpath";
pub const POLICY_LABEL: &str = "containerd.io/restart.policy";
pub const COUNT_LABEL: &str = "containerd.io/restart.count";
pub const EXPLICITLY_STOPPED_LABEL: &str = "containerd.io/restart.explicitly-stopped";

/// A container's restart policy (`containerd.io/restart.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    No,
    Always,
    /// `max_retries` 0: no limit.
    OnFailure {
        max_retries: u32,
    },
    UnlessStopped,
}

impl Policy {
    /// Parses a label value; empty means `always`. Only `on-failure` takes a count.
    pub fn parse(text: &str) -> Result<Policy> {
        let (name, count) = match text.split_once(':') {
            Some((name, count)) => (name, Some(count)),
            None => (text, None),
        };
        let policy = match name {
            "" | "always" => Policy::Always,
            "no" => Policy::No,
            "unless-stopped" => Policy::UnlessStopped,
            "on-failure" => Policy::OnFailure { max_retries: 0 },
            _ => {
                return Err(Error::invalid_argument(format!(
                    "restart policy {text:?} not supported"
                )));
            }
        };
        match (policy, count) {
            (_, None) => Ok(policy),
            (Policy::OnFailure { .. }, Some(count)) => {
                let max_retries = count.parse().map_err(|_| {
                    Error::invalid_argument(format!("invalid max retry count: {count:?}"))
                })?;
                Ok(Policy::OnFailure { max_retries })
            }
            (_, Some(_)) => Err(Error::invalid_argument(format!(
                "restart policy {name:?} does not support a max retry count"
            ))),
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::No => f.write_str("no"),
            Policy::Always => f.write_str("always"),
            Policy::OnFailure { max_retries: 0 } => f.write_str("on-failure"),
            Policy::OnFailure { max_retries } => write!(f, "on-failure:{max_retries}"),
            Policy::UnlessStopped => f.write_str("unless-stopped"),
        }
    }
}

/// containerd's `restart.Reconcile`: whether a container whose task is gone or ended
/// with `exit_status` gets a new one, by its policy and restart count labels.
pub fn should_restart(exit_status: u32, labels: &Labels) -> Result<bool> {
    let policy = Policy::parse(labels.get(POLICY_LABEL).map(String::as_str).unwrap_or(""))?;
    Ok(match policy {
        Policy::Always => true,
        Policy::No => false,
        Policy::OnFailure { max_retries } => {
            let count = restart_count(labels)?;
            exit_status != 0 && (max_retries == 0 || count < max_retries)
        }
        Policy::UnlessStopped => !labels
            .get(EXPLICITLY_STOPPED_LABEL)
            .is_some_and(|v| parse_go_bool(v).unwrap_or(false)),
    })
}

/// `containerd.io/restart.count`, 0 when absent.
fn restart_count(labels: &Labels) -> Result<u32> {
    match labels.get(COUNT_LABEL).map(String::as_str) {
        None | Some("") => Ok(0),
        Some(v) => v.parse().map_err(|_| {
            Error::invalid_argument(format!("invalid {COUNT_LABEL} label value {v:?}"))
        }),
    }
}

/// Go's `strconv.ParseBool`, which the label is read with.
fn parse_go_bool(text: &str) -> Option<bool> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct RestartConfig {
    /// How often containers are reconciled (Go duration form: `10s`, `500ms`, `1m`).
    pub interval: String,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            interval: "10s".into(),
        }
    }
}

/// Parses a Go-style duration (`1m30s`, `500ms`, `10s`).
pub fn parse_duration(text: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ns" => value / 1e9,
            "us" | "µs" => value / 1e6,
            "ms" => value / 1e3,
            "s" => value,
            "m" => value * 60.0,
            "h" => value * 3600.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(seconds);
        rest = &rest[unit_len..];
    }
    Some(total)
}

pub struct RestartMonitor {
    store: Arc<MetadataStore>,
    runtime: Arc<dyn Runtime>,
    events: Exchange,
    /// For the root file system of containers made from a snapshot.
    snapshotters: Option<berth_metadata::snapshots::Snapshotters>,
}

fn restart_io(container: &Container) -> IoConfig {
    let uri = container
        .labels
        .get(LOG_URI_LABEL)
        .cloned()
        .or_else(|| {
            container
                .labels
                .get(LOG_PATH_LABEL)
                .map(|p| format!("file://{p}"))
        })
        .unwrap_or_default();
    IoConfig {
        stdin: String::new(),
        stdout: uri.clone(),
        stderr: uri,
        terminal: false,
    }
}

impl RestartMonitor {
    /// One pass over every namespace's labelled containers.
    pub async fn reconcile(&self) -> Result<()> {
        let store = self.store.clone();
        let labelled = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for ns in store.list_namespaces()? {
                for c in store.list_containers(&ns)? {
                    if c.labels.contains_key(STATUS_LABEL) {
                        out.push((ns.clone(), c));
                    }
                }
            }
            Ok::<_, berth_core::Error>(out)
        })
        .await
        .map_err(|e| berth_core::Error::unknown(format!("restart monitor: {e}")))??;
        for (ns, container) in labelled {
            let desired = container.labels[STATUS_LABEL].as_str();
            let result = match desired {
                "running" => self.ensure_running(&ns, &container).await,
                "stopped" => self.ensure_stopped(&ns, &container.id).await,
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(namespace = %ns, id = %container.id, desired, error = %e, "restart monitor");
            }
        }
        Ok(())
    }

    async fn ensure_running(&self, ns: &str, container: &Container) -> Result<()> {
        // A deleted task leaves no exit status: 0, as containerd's zero `Status`.
        let mut exit_status = 0;
        let task = self.runtime.get(ns, &container.id).await.ok();
        if let Some(task) = &task {
            let state = task.state("").await?;
            match state.status {
                TaskStatus::Stopped => exit_status = state.exit_status,
                _ => return Ok(()),
            }
        }
        if !should_restart(exit_status, &container.labels)? {
            return Ok(());
        }
        let count = restart_count(&container.labels).unwrap_or(0) + 1;
        self.record_count(ns, container, count).await?;
        if task.is_some() {
            self.runtime.delete(ns, &container.id).await?;
        }
        tracing::info!(namespace = %ns, id = %container.id, count, "restart monitor: starting task");
        let create = TaskCreate {
            io: restart_io(container),
            rootfs: self.rootfs(ns, container).await?,
            ..Default::default()
        };
        let task = create_task(&self.store, &self.runtime, ns, &container.id, create).await?;
        if let Err(e) = task.start("").await {
            let _ = self.runtime.delete(ns, &container.id).await;
            return Err(e);
        }
        Ok(())
    }

    /// The mounts of the container's snapshot, as containerd's `container.NewTask` asks
    /// the snapshotter for them (none for a container with a root file system path in
    /// its spec).
    async fn rootfs(
        &self,
        ns: &str,
        container: &Container,
    ) -> Result<Vec<berth_core::mount::Mount>> {
        if container.snapshot_key.is_empty() {
            return Ok(Vec::new());
        }
        let snapshotters = self.snapshotters.as_ref().ok_or_else(|| {
            Error::failed_precondition("no snapshotters: cannot mount the container's snapshot")
        })?;
        snapshotters
            .get(&container.snapshotter)?
            .namespaced(ns, None)
            .mounts(&container.snapshot_key)
            .await
            .map_err(|e| e.context(format!("mounts of snapshot {:?}", container.snapshot_key)))
    }

    /// Sets `containerd.io/restart.count` before the restart (containerd's
    /// `WithAdditionalContainerLabels` update, with its `/containers/update` event).
    async fn record_count(&self, ns: &str, container: &Container, count: u32) -> Result<()> {
        let mut requested = container.clone();
        requested
            .labels
            .insert(COUNT_LABEL.to_string(), count.to_string());
        let (store, namespace) = (self.store.clone(), ns.to_string());
        let updated = tokio::task::spawn_blocking(move || {
            store.update_container(&namespace, requested, &[format!("labels.{COUNT_LABEL}")])
        })
        .await
        .map_err(|e| Error::unknown(format!("restart monitor: {e}")))?
        .map_err(|e| e.context(format!("recording the restart count of {}", container.id)))?;
        let event = ContainerUpdate {
            id: updated.id.clone(),
            image: updated.image.clone(),
            labels: updated.labels.clone().into_iter().collect(),
            snapshot_key: updated.snapshot_key.clone(),
        };
        let _ = self
            .events
            .publish(ns, "/containers/update", any::pack(&event));
        Ok(())
    }

    async fn ensure_stopped(&self, ns: &str, id: &str) -> Result<()> {
        let Ok(task) = self.runtime.get(ns, id).await else {
            return Ok(());
        };
        let state = task.state("").await?;
        if state.status != TaskStatus::Stopped {
            tracing::info!(namespace = %ns, id, "restart monitor: stopping task");
            task.kill("", 9, true).await?;
            let _ = tokio::time::timeout(Duration::from_secs(10), task.wait("")).await;
        }
        self.runtime.delete(ns, id).await?;
        Ok(())
    }
}

/// The instance is an `Arc<RestartMonitor>`; its loop runs for the daemon's lifetime.
pub fn registration() -> Registration {
    Registration::new(types::INTERNAL, "restart", |ctx: InitContext| async move {
        let config: RestartConfig = ctx.config()?;
        let interval = parse_duration(&config.interval)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                berth_core::Error::invalid_argument(format!(
                    "restart monitor interval {:?} is not a duration",
                    config.interval
                ))
            })?;
        let monitor = Arc::new(RestartMonitor {
            store: ctx.get(types::METADATA)?,
            runtime: ctx.get(types::RUNTIME_V2)?,
            events: ctx.events.clone(),
            snapshotters: ctx.get_by_id(types::SERVICE, "snapshots-service").ok(),
        });
        let looping = monitor.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = looping.reconcile().await {
                    tracing::warn!(error = %e, "restart monitor");
                }
                tokio::time::sleep(interval).await;
            }
        });
        Ok(Arc::new(monitor) as Instance)
    })
    .requires(&[types::METADATA, types::RUNTIME_V2, types::SERVICE])
    .with_config::<RestartConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn policies_parse_as_containerd_names_them() {
        assert_eq!(Policy::parse("").unwrap(), Policy::Always);
        assert_eq!(Policy::parse("always").unwrap(), Policy::Always);
        assert_eq!(Policy::parse("no").unwrap(), Policy::No);
        assert_eq!(
            Policy::parse("unless-stopped").unwrap(),
            Policy::UnlessStopped
        );
        assert_eq!(
            Policy::parse("on-failure").unwrap(),
            Policy::OnFailure { max_retries: 0 }
        );
        assert_eq!(
            Policy::parse("on-failure:3").unwrap(),
            Policy::OnFailure { max_retries: 3 }
        );
        for p in [
            "on-failure:3",
            "on-failure",
            "no",
            "always",
            "unless-stopped",
        ] {
            assert_eq!(Policy::parse(p).unwrap().to_string(), p);
        }
        for bad in [
            "sometimes",
            "always:2",
            "no:1",
            "on-failure:x",
            "on-failure:",
            "on-failure:-1",
        ] {
            let err = Policy::parse(bad).unwrap_err();
            assert!(
                err.is(berth_core::error::ErrorKind::InvalidArgument),
                "{bad}"
            );
        }
    }

    #[test]
    fn reconcile_follows_the_policy() {
        let r = |exit, pairs: &[(&str, &str)]| should_restart(exit, &labels(pairs)).unwrap();
        assert!(r(0, &[]));
        assert!(r(0, &[(POLICY_LABEL, "always")]));
        assert!(!r(1, &[(POLICY_LABEL, "no")]));
        assert!(!r(0, &[(POLICY_LABEL, "on-failure")]));
        assert!(r(1, &[(POLICY_LABEL, "on-failure")]));
        assert!(r(1, &[(POLICY_LABEL, "on-failure"), (COUNT_LABEL, "99")]));
        assert!(r(1, &[(POLICY_LABEL, "on-failure:2"), (COUNT_LABEL, "1")]));
        assert!(!r(1, &[(POLICY_LABEL, "on-failure:2"), (COUNT_LABEL, "2")]));
        assert!(r(0, &[(POLICY_LABEL, "unless-stopped")]));
        assert!(!r(
            0,
            &[
                (POLICY_LABEL, "unless-stopped"),
                (EXPLICITLY_STOPPED_LABEL, "true")
            ]
        ));
        assert!(r(
            0,
            &[
                (POLICY_LABEL, "unless-stopped"),
                (EXPLICITLY_STOPPED_LABEL, "false")
            ]
        ));
        // Unparsable labels: no restart, and the error says why.
        assert!(should_restart(1, &labels(&[(POLICY_LABEL, "sometimes")])).is_err());
        assert!(
            should_restart(
                1,
                &labels(&[(POLICY_LABEL, "on-failure:3"), (COUNT_LABEL, "x")])
            )
            .is_err()
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration(""), None);
    }
}
