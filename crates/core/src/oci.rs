//! Defaults of the OCI runtime spec that every spec Berth builds shares (`berth run`'s
//! and the CRI's), so a hardening of one reaches all.

/// containerd's default `linux.maskedPaths`, plus the RAPL powercap counters (a power
/// side channel, GHSA-7ww5-4wqc-m92c, masked by containerd since 1.6.26).
pub const DEFAULT_MASKED_PATHS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
    "/sys/devices/virtual/powercap",
];

/// containerd's default `linux.readonlyPaths`.
pub const DEFAULT_READONLY_PATHS: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];
