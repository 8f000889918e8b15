//! `io.containerd.internal.v1.restart`: the restart monitor. Every `interval`, containers
//! labelled `containerd.io/restart.status=running` whose task is missing or stopped get a
//! new task (output to `containerd.io/restart.loguri` or `…restart.logpath` if set), and
//! containers labelled `…=stopped` have their task killed and deleted.

use crate::tasks::{TaskCreate, create_task};
use berth_core::Result;
use berth_core::runtime::{IoConfig, Runtime, TaskStatus};
use berth_metadata::MetadataStore;
use berth_metadata::containers::Container;
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

pub const STATUS_LABEL: &str = "containerd.io/restart.status";
pub const LOG_URI_LABEL: &str = "containerd.io/restart.loguri";
pub const LOG_PATH_LABEL: &str = "containerd.io/restart.logpath";

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
        if let Ok(task) = self.runtime.get(ns, &container.id).await {
            let state = task.state("").await?;
            match state.status {
                TaskStatus::Stopped => {
                    self.runtime.delete(ns, &container.id).await?;
                }
                _ => return Ok(()),
            }
        }
        tracing::info!(namespace = %ns, id = %container.id, "restart monitor: starting task");
        let create = TaskCreate {
            io: restart_io(container),
            ..Default::default()
        };
        let task = create_task(&self.store, &self.runtime, ns, &container.id, create).await?;
        if let Err(e) = task.start("").await {
            let _ = self.runtime.delete(ns, &container.id).await;
            return Err(e);
        }
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
    .requires(&[types::METADATA, types::RUNTIME_V2])
    .with_config::<RestartConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration(""), None);
    }
}
