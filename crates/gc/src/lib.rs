//! `io.containerd.gc.v1.scheduler`: decides when the metadata collector runs, with
//! containerd's settings and semantics (`gc/scheduler`):
//!
//! - `pause_threshold` (default 0.02, clamped to 0..=0.5): the fraction of time the
//!   collector may hold the metadata; after each collection the next one is at least
//!   `avg/pause_threshold - avg` away (`avg` = mean collection time);
//! - `deletion_threshold` (default 0): a collection is scheduled (after `schedule_delay`)
//!   once this many mutations happened while a deletion was pending; with 0, deletions
//!   are collected at the next scheduled interval (right away if none is scheduled);
//! - `mutation_threshold` (default 100): mutations after which a collection runs at the
//!   next interval even without deletions;
//! - `schedule_delay` (default "0ms"): delay between a trigger and the collection;
//! - `startup_delay` (default "100ms"): the first collection after start-up, which also
//!   sweeps blobs a crash left without records.
//!
//! Durations are Go-style strings (`"100ms"`, `"1m30s"`). A manual trigger
//! ([`GcScheduler::schedule_and_wait`], used by `sync` deletes) always collects.

use berth_core::{Error, Result};
use berth_metadata::MetadataStore;
use berth_metadata::gc::{Collector, GcFuture, GcScheduler, GcStats};
use berth_plugin::{InitContext, Instance, Registration, types};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub pause_threshold: f64,
    pub deletion_threshold: i64,
    pub mutation_threshold: i64,
    pub schedule_delay: String,
    pub startup_delay: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            pause_threshold: 0.02,
            deletion_threshold: 0,
            mutation_threshold: 100,
            schedule_delay: "0s".into(),
            startup_delay: "100ms".into(),
        }
    }
}

/// Parses a Go duration (`"300ms"`, `"-1.5h"`, `"2h45m"`, `"0"`).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let bad = || Error::invalid_argument(format!("time: invalid duration {s:?}"));
    let mut rest = s.trim();
    let negative = rest.starts_with('-');
    rest = rest.trim_start_matches(['-', '+']);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| {
                Error::invalid_argument(format!("time: missing unit in duration {s:?}"))
            })?;
        let value: f64 = rest[..num_len].parse().map_err(|_| bad())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            u => {
                return Err(Error::invalid_argument(format!(
                    "time: unknown unit {u:?} in duration {s:?}"
                )));
            }
        };
        total += value * nanos;
        rest = &rest[unit_len..];
    }
    if negative {
        return Ok(Duration::ZERO);
    }
    Ok(Duration::from_nanos(total as u64))
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub pause_threshold: f64,
    pub deletion_threshold: u64,
    pub mutation_threshold: u64,
    pub schedule_delay: Duration,
    pub startup_delay: Duration,
}

impl Settings {
    pub fn from_config(c: &SchedulerConfig) -> Result<Settings> {
        Ok(Settings {
            pause_threshold: c.pause_threshold.clamp(0.0, 0.5),
            deletion_threshold: c.deletion_threshold.max(0) as u64,
            mutation_threshold: c.mutation_threshold.max(0) as u64,
            schedule_delay: parse_duration(&c.schedule_delay)
                .map_err(|e| e.context("schedule_delay"))?,
            startup_delay: parse_duration(&c.startup_delay)
                .map_err(|e| e.context("startup_delay"))?,
        })
    }
}

type Waiter = oneshot::Sender<Result<GcStats>>;

/// The running scheduler.
pub struct Scheduler {
    trigger: mpsc::UnboundedSender<Waiter>,
    collector: Arc<Collector>,
    timer_wakeups: Arc<AtomicU64>,
}

impl Scheduler {
    /// Starts the scheduling task on the current tokio runtime.
    pub fn start(md: Arc<MetadataStore>, settings: Settings) -> Arc<Scheduler> {
        let collector = Arc::new(Collector::new(md.clone()));
        let (tx, rx) = mpsc::unbounded_channel();
        let timer_wakeups = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(
            md,
            collector.clone(),
            settings,
            rx,
            timer_wakeups.clone(),
        ));
        Arc::new(Scheduler {
            trigger: tx,
            collector,
            timer_wakeups,
        })
    }

    /// How often the scheduling timer has fired (an idle daemon's timer stays quiet).
    pub fn timer_wakeups(&self) -> u64 {
        self.timer_wakeups.load(Ordering::Relaxed)
    }

    pub fn collector(&self) -> &Arc<Collector> {
        &self.collector
    }
}

impl GcScheduler for Scheduler {
    fn schedule_and_wait(&self) -> GcFuture {
        let (tx, rx) = oneshot::channel();
        let sent = self.trigger.send(tx);
        Box::pin(async move {
            sent.map_err(|_| Error::unavailable("gc scheduler stopped"))?;
            rx.await.map_err(|_| Error::unknown("gc failed"))?
        })
    }
}

async fn run(
    md: Arc<MetadataStore>,
    collector: Arc<Collector>,
    s: Settings,
    mut rx: mpsc::UnboundedReceiver<Waiter>,
    timer_wakeups: Arc<AtomicU64>,
) {
    let mut next: Option<Instant> =
        (s.startup_delay > Duration::ZERO).then(|| Instant::now() + s.startup_delay);
    let mut last_collection: Option<Instant> = None;
    let mut interval = Duration::from_secs(1);
    let (mut gc_time, mut collections) = (Duration::ZERO, 0u32);
    let (mut triggered, mut deletions, mut mutations) = (false, 0u64, 0u64);
    let mut seen = md.mutations();
    let mut waiters: Vec<Waiter> = Vec::new();
    loop {
        let sleep = async {
            match next {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                timer_wakeups.fetch_add(1, Ordering::Relaxed);
                // A deletion's dirty mark lands just after its commit's notification.
                if deletions == 0 && md.dirty() > 0 {
                    deletions = 1;
                }
                if !triggered && last_collection.is_some() && deletions == 0
                    && (s.mutation_threshold == 0 || mutations < s.mutation_threshold)
                {
                    // Nothing to collect: sleep until the metadata changes. containerd
                    // re-arms the timer every `interval` here, which on a small
                    // database (collections of ~0.1 ms, pause_threshold 0.02) wakes an
                    // idle daemon every few milliseconds forever.
                    next = None;
                    continue;
                }
            }
            _ = md.changed() => {
                let now = md.mutations();
                let delta = now.saturating_sub(seen);
                seen = now;
                if delta == 0 {
                    continue;
                }
                if md.dirty() > 0 {
                    deletions += delta;
                }
                mutations += delta;
                let schedule = (s.deletion_threshold > 0 && deletions >= s.deletion_threshold)
                    || (next.is_none()
                        && ((s.deletion_threshold == 0 && deletions > 0)
                            || (s.mutation_threshold > 0 && mutations >= s.mutation_threshold)));
                if schedule {
                    let at = Instant::now() + s.schedule_delay;
                    if next.is_none_or(|n| n > at) {
                        next = Some(at);
                    }
                }
                // The check containerd's ever-running timer would make: one tick after a
                // change (it also sees a dirty mark that lands after its notification).
                if next.is_none() && last_collection.is_some() {
                    next = Some(Instant::now() + interval);
                }
                continue;
            }
            waiter = rx.recv() => {
                let Some(waiter) = waiter else { return };
                waiters.push(waiter);
                triggered = true;
                let at = Instant::now() + s.schedule_delay;
                if next.is_none_or(|n| n > at) {
                    next = Some(at);
                }
                continue;
            }
        }

        let c = collector.clone();
        let result = tokio::task::spawn_blocking(move || c.collect())
            .await
            .unwrap_or_else(|e| Err(Error::unknown(format!("gc task failed: {e}"))));
        seen = md.mutations();
        let now = Instant::now();
        match &result {
            Ok(stats) => {
                tracing::debug!(d = ?stats.meta, "garbage collected");
                gc_time += stats.meta;
                collections += 1;
                triggered = false;
                deletions = 0;
                mutations = 0;
                if s.pause_threshold > 0.0 {
                    let avg = gc_time.as_secs_f64() / collections as f64;
                    interval = Duration::from_secs_f64(avg / s.pause_threshold - avg);
                }
                next = Some(now + interval);
            }
            Err(err) => {
                tracing::error!(error = %err, "garbage collection failed");
                next = Some(now + interval + Duration::from_secs(1));
            }
        }
        last_collection = Some(now);
        for w in waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}

/// The plugin; its instance is an `Arc<dyn GcScheduler>`.
pub fn registration() -> Registration {
    Registration::new(types::GC, "scheduler", |ctx: InitContext| async move {
        let config: SchedulerConfig = ctx.config()?;
        let settings = Settings::from_config(&config)?;
        let md: Arc<MetadataStore> = ctx.get(types::METADATA)?;
        ctx.export("PauseThreshold", settings.pause_threshold.to_string());
        ctx.export("DeletionThreshold", settings.deletion_threshold.to_string());
        ctx.export("MutationThreshold", settings.mutation_threshold.to_string());
        ctx.export("ScheduleDelay", format!("{:?}", settings.schedule_delay));
        // Start-up repair: records whose blob vanished.
        let repair_md = md.clone();
        let repaired = tokio::task::spawn_blocking(move || Collector::new(repair_md).repair())
            .await
            .map_err(|e| Error::unknown(format!("gc repair failed: {e}")))??;
        if repaired > 0 {
            tracing::warn!(repaired, "removed content records whose blobs were missing");
        }
        let scheduler: Arc<dyn GcScheduler> = Scheduler::start(md, settings);
        Ok(Arc::new(scheduler) as Instance)
    })
    .requires(&[types::METADATA])
    .with_config::<SchedulerConfig>()
}

pub fn registrations() -> Vec<Registration> {
    vec![registration()]
}

#[cfg(test)]
mod tests;
