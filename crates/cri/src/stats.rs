//! `ContainerStats` and `ListContainerStats` as containerd 1.6 answers them: CPU and
//! memory from the task's cgroup metrics (`io.containerd.cgroups.v1.Metrics` or `v2`,
//! what the shim's `Stats` returns), the writable layer from the snapshotter's usage of
//! the container's snapshot.

use crate::api;
use crate::store::{self, ContainerMeta, NS};
use crate::{CriService, to_status};
use berth_metadata::containers::Container;
use containerd_shim_protos::cgroups::metrics as v1;
use containerd_shim_protos::cgroups_v2::metrics as v2;
use containerd_shim_protos::protobuf::Message;
use tonic::Status;

fn u64v(value: u64) -> Option<api::UInt64Value> {
    Some(api::UInt64Value { value })
}

/// CPU and memory of a metrics payload (containerd's `cpuContainerStats` and
/// `memoryContainerStats`: the working set is usage minus inactive file pages).
pub fn cpu_memory(
    any: &prost_types::Any,
    timestamp: i64,
) -> Option<(api::CpuUsage, api::MemoryUsage)> {
    let working_set = |usage: u64, inactive: u64| usage.saturating_sub(inactive);
    if any.type_url.ends_with("cgroups.v1.Metrics") {
        let m = v1::Metrics::parse_from_bytes(&any.value).ok()?;
        let cpu = api::CpuUsage {
            timestamp,
            usage_core_nano_seconds: u64v(m.cpu.usage.total),
            ..Default::default()
        };
        let mem = &m.memory;
        let usage = mem.usage.usage;
        let ws = working_set(usage, mem.total_inactive_file);
        let limit = mem.usage.limit;
        let memory = api::MemoryUsage {
            timestamp,
            working_set_bytes: u64v(ws),
            available_bytes: u64v(limit.saturating_sub(ws)),
            usage_bytes: u64v(usage),
            rss_bytes: u64v(mem.total_rss),
            page_faults: u64v(mem.total_pg_fault),
            major_page_faults: u64v(mem.total_pg_maj_fault),
        };
        Some((cpu, memory))
    } else if any.type_url.ends_with("cgroups.v2.Metrics") {
        let m = v2::Metrics::parse_from_bytes(&any.value).ok()?;
        let cpu = api::CpuUsage {
            timestamp,
            usage_core_nano_seconds: u64v(m.cpu.usage_usec * 1000),
            ..Default::default()
        };
        let mem = &m.memory;
        let ws = working_set(mem.usage, mem.inactive_file);
        let memory = api::MemoryUsage {
            timestamp,
            working_set_bytes: u64v(ws),
            available_bytes: u64v(mem.usage_limit.saturating_sub(ws)),
            usage_bytes: u64v(mem.usage),
            rss_bytes: u64v(mem.anon),
            page_faults: u64v(mem.pgfault),
            major_page_faults: u64v(mem.pgmajfault),
        };
        Some((cpu, memory))
    } else {
        None
    }
}

impl CriService {
    async fn stats_of(
        &self,
        record: &Container,
        meta: &ContainerMeta,
    ) -> Result<api::ContainerStats, Status> {
        let config = meta.config();
        let timestamp = store::nanos(std::time::SystemTime::now());
        let mut stats = api::ContainerStats {
            attributes: Some(api::ContainerAttributes {
                id: record.id.clone(),
                metadata: config.metadata.clone(),
                labels: config.labels.clone(),
                annotations: config.annotations.clone(),
            }),
            ..Default::default()
        };
        if let Ok(task) = self.inner.runtime.get(NS, &record.id).await {
            let any = task.stats().await.map_err(|e| {
                Status::unknown(format!(
                    "failed to fetch metrics for task {:?}: {}",
                    record.id,
                    e.message()
                ))
            })?;
            if let Some((cpu, memory)) = cpu_memory(&any, timestamp) {
                stats.cpu = Some(cpu);
                stats.memory = Some(memory);
            }
        }
        use berth_core::snapshot::Snapshotter;
        if let Ok(db) = self.inner.snapshotters.get(&record.snapshotter)
            && let Ok(usage) = db.namespaced(NS, None).usage(&record.snapshot_key).await
        {
            stats.writable_layer = Some(api::FilesystemUsage {
                timestamp,
                fs_id: Some(api::FilesystemIdentifier {
                    mountpoint: self.inner.image_fs_path.display().to_string(),
                }),
                used_bytes: u64v(usage.size.max(0) as u64),
                inodes_used: u64v(usage.inodes.max(0) as u64),
            });
        }
        Ok(stats)
    }

    pub(crate) async fn container_stats(
        &self,
        r: api::ContainerStatsRequest,
    ) -> Result<api::ContainerStatsResponse, Status> {
        let (record, meta) = self.find_container(&r.container_id).await?;
        Ok(api::ContainerStatsResponse {
            stats: Some(self.stats_of(&record, &meta).await?),
        })
    }

    pub(crate) async fn list_container_stats(
        &self,
        r: api::ListContainerStatsRequest,
    ) -> Result<api::ListContainerStatsResponse, Status> {
        let filter = r.filter.unwrap_or_default();
        let mut out = Vec::new();
        for (record, meta) in store::containers(&self.inner.md).await.map_err(to_status)? {
            if !filter.id.is_empty() && !record.id.starts_with(&filter.id) {
                continue;
            }
            if !filter.pod_sandbox_id.is_empty()
                && !meta.sandbox_id.starts_with(&filter.pod_sandbox_id)
            {
                continue;
            }
            if !store::labels_match(&filter.label_selector, &meta.config().labels) {
                continue;
            }
            match self.stats_of(&record, &meta).await {
                Ok(stats) => out.push(stats),
                Err(e) => tracing::debug!(id = record.id, error = %e.message(), "container stats"),
            }
        }
        Ok(api::ListContainerStatsResponse { stats: out })
    }
}
