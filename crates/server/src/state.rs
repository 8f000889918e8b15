//! What the daemon knows about itself at run time: shown by SIGUSR1, the debug socket and
//! the metrics endpoint.

use berth_core::events::Exchange;
use berth_plugin::{PluginRecord, Status};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Shared, cheap to clone.
#[derive(Clone)]
pub struct DaemonState {
    inner: Arc<Inner>,
}

struct Inner {
    started: Instant,
    /// Complete: the state is built after plugin initialisation.
    records: Vec<PluginRecord>,
    exchange: Exchange,
    /// gRPC calls currently being handled (a stream counts until its reply starts).
    in_flight: AtomicUsize,
    /// Signalled whenever the last call in flight ends (see [`DaemonState::call_ended`]).
    quiet: tokio::sync::Notify,
    version: &'static str,
}

/// Plugin counts by outcome.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PluginCounts {
    pub loaded: usize,
    pub failed: usize,
    pub skipped: usize,
}

impl DaemonState {
    pub fn new(records: Vec<PluginRecord>, exchange: Exchange) -> Self {
        DaemonState {
            inner: Arc::new(Inner {
                started: Instant::now(),
                records,
                exchange,
                in_flight: AtomicUsize::new(0),
                quiet: tokio::sync::Notify::new(),
                version: env!("CARGO_PKG_VERSION"),
            }),
        }
    }

    pub fn version(&self) -> &'static str {
        self.inner.version
    }

    pub fn uptime_seconds(&self) -> f64 {
        self.inner.started.elapsed().as_secs_f64()
    }

    pub fn plugin_counts(&self) -> PluginCounts {
        let mut counts = PluginCounts::default();
        for record in &self.inner.records {
            match record.status {
                Status::Loaded => counts.loaded += 1,
                Status::Failed(_) => counts.failed += 1,
                Status::Skipped(_) => counts.skipped += 1,
            }
        }
        counts
    }

    pub fn event_subscribers(&self) -> usize {
        self.inner.exchange.subscriber_count()
    }

    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Marks one gRPC call as running until the guard is dropped.
    pub fn call_started(&self) -> CallGuard {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            state: self.clone(),
        }
    }

    /// Completes after a moment at which no gRPC call was in flight (at once if one passed
    /// since the last wait): the end of a burst of work.
    pub async fn call_ended(&self) {
        self.inner.quiet.notified().await;
    }

    /// The runtime's live tasks (the Go daemon's goroutine count, in spirit).
    pub fn async_tasks() -> usize {
        tokio::runtime::Handle::try_current()
            .map(|h| h.metrics().num_alive_tasks())
            .unwrap_or(0)
    }

    /// A human-readable report: plugins with their status, open streams, memory.
    pub fn dump(&self) -> String {
        let mut out = String::new();
        let counts = self.plugin_counts();
        let _ = writeln!(
            out,
            "berthd {} pid {} up {:.1}s, rss {} KiB, async tasks {}",
            self.inner.version,
            std::process::id(),
            self.uptime_seconds(),
            process_rss_bytes().unwrap_or(0) / 1024,
            Self::async_tasks()
        );
        let _ = writeln!(
            out,
            "grpc calls in flight: {}; event subscribers: {}",
            self.in_flight(),
            self.event_subscribers()
        );
        // What shims and runtimes started from now on inherit (the opt plugin's doing).
        for variable in ["PATH", "LD_LIBRARY_PATH"] {
            let value = std::env::var(variable).unwrap_or_default();
            let _ = writeln!(out, "{variable}={value}");
        }
        let _ = writeln!(
            out,
            "plugins: {} loaded, {} failed, {} skipped",
            counts.loaded, counts.failed, counts.skipped
        );
        for record in &self.inner.records {
            let status = match &record.status {
                Status::Loaded => "ok".to_string(),
                Status::Failed(e) => format!("error: {e}"),
                Status::Skipped(why) => format!("skip: {why}"),
            };
            let _ = writeln!(out, "  {} {}", record.uri(), status);
        }
        out
    }
}

/// Decrements the in-flight count when a call ends.
pub struct CallGuard {
    state: DaemonState,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.state.inner.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.state.inner.quiet.notify_one();
        }
    }
}

/// The resident set size of this process (`VmRSS` of `/proc/self/status`).
pub fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Prometheus text exposition of the daemon's gauges.
pub fn prometheus_text(state: &DaemonState) -> String {
    let counts = state.plugin_counts();
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name} {value}");
    };
    gauge(
        "berth_process_resident_memory_bytes",
        "Resident memory size of berthd in bytes.",
        process_rss_bytes().unwrap_or(0).to_string(),
    );
    gauge(
        "berth_uptime_seconds",
        "Seconds since berthd started.",
        format!("{:.3}", state.uptime_seconds()),
    );
    gauge(
        "berth_async_tasks",
        "Live tasks of berthd's async runtime.",
        DaemonState::async_tasks().to_string(),
    );
    gauge(
        "berth_grpc_calls_in_flight",
        "gRPC calls being handled.",
        state.in_flight().to_string(),
    );
    gauge(
        "berth_event_subscribers",
        "Open event subscriptions.",
        state.event_subscribers().to_string(),
    );
    let _ = writeln!(
        out,
        "# HELP berth_plugins Plugins by initialisation outcome."
    );
    let _ = writeln!(out, "# TYPE berth_plugins gauge");
    for (status, count) in [
        ("ok", counts.loaded),
        ("error", counts.failed),
        ("skip", counts.skipped),
    ] {
        let _ = writeln!(out, "berth_plugins{{status=\"{status}\"}} {count}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rss_is_read() {
        let rss = process_rss_bytes().unwrap();
        assert!(rss > 0);
    }

    #[test]
    fn metrics_text_has_gauges() {
        let state = DaemonState::new(Vec::new(), Exchange::new());
        let text = prometheus_text(&state);
        assert!(text.contains("berth_process_resident_memory_bytes "));
        assert!(text.contains("berth_plugins{status=\"ok\"} 0"));
        let guard = state.call_started();
        assert_eq!(state.in_flight(), 1);
        drop(guard);
        assert_eq!(state.in_flight(), 0);
    }
}
