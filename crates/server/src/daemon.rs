//! The daemon's life: prepare the process (directories, OOM score, opt environment) while
//! it is single-threaded, start a small async runtime, initialise the plugins, serve, and
//! shut down gracefully on SIGTERM/SIGINT.

use crate::config::Config;
use crate::state::DaemonState;
use crate::ttrpc_server::TtrpcServer;
use crate::{endpoints, notify, opt, plugins, sockets};
use anyhow::{Context, anyhow, bail};
use berth_core::events::Exchange;
use berth_plugin::{DaemonInfo, GrpcService, InitOptions, PluginSet, types};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

/// How long in-flight calls (and open streams such as `ctr events`) may run on after a
/// shutdown signal before the daemon closes them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Worker threads of the async runtime: the daemon is I/O bound and idles most of the
/// time, and every thread costs memory (stack, allocator arena).
const WORKER_THREADS: usize = 2;

/// Runs the daemon until it is told to stop. Must be called while the process is still
/// single-threaded (it changes the environment for the opt plugin).
pub fn run(config: Config) -> anyhow::Result<()> {
    let started = Instant::now();
    prepare_process(&config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .max_blocking_threads(16)
        // Blocking threads (metadata transactions, file work) exit after a second
        // without work, so that an idle daemon does not keep a burst's threads.
        .thread_keep_alive(Duration::from_secs(1))
        .thread_name("berthd")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve(config, started))
}

/// Work that must happen before any thread exists, or before any plugin runs.
fn prepare_process(config: &Config) -> anyhow::Result<()> {
    limit_malloc_arenas();
    // The root holds the metadata and content stores and every snapshot: nobody else
    // needs to reach into it (CVE-2024-25621: containerd made it 0711 before 1.7.29;
    // an existing root is tightened too). The state directory stays 0711 so that
    // user-namespaced containers can reach their bundles, as in containerd.
    create_directory(Path::new(&config.root), 0o700)?;
    create_directory(Path::new(&config.state), 0o711)?;
    if !config.temp.is_empty() {
        create_directory(Path::new(&config.temp), 0o700)?;
        // SAFETY: single-threaded here (see `run`), so nobody reads the environment
        // concurrently. Shims and runtimes inherit it, as with containerd.
        unsafe { std::env::set_var("TMPDIR", &config.temp) };
    }
    if config.oom_score != 0 {
        apply_oom_score(config.oom_score);
    }
    if !config.cgroup.path.is_empty() {
        join_cgroup(&config.cgroup.path)?;
    }
    match opt::prepare_environment(config) {
        Ok(Some(path)) => tracing::debug!(path = %path.display(), "opt directory ready"),
        Ok(None) => {}
        // The opt plugin's init reports the failure (ctr plugins ls shows it).
        Err(e) => tracing::warn!(error = %e, "preparing the opt directory"),
    }
    Ok(())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
    fn malloc_trim(pad: usize) -> i32;
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), each keeping
/// its own free memory; the daemon mostly idles, so one shared arena is enough.
///
/// glibc also raises its mmap and trim thresholds (up to 32 and 64 MiB) each time a
/// large block is freed; fixed thresholds bound how much a burst can keep in the heap.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only adjusts allocator tuning; called before other threads.
        unsafe {
            mallopt(M_ARENA_MAX, 1);
            // Up to 8 MiB from the heap, kept there while busy: content writes and
            // layer data arrive as ~1 MiB messages, and with a 128 KiB threshold each
            // one was a fresh mmap that faulted in 256 pages and was unmapped again
            // (a quarter of the daemon's CPU time in a `ctr content ingest`). What a
            // burst leaves free is handed back by `release_memory_after_bursts`, so the
            // idle footprint does not depend on these thresholds.
            mallopt(M_MMAP_THRESHOLD, 8 << 20);
            mallopt(M_TRIM_THRESHOLD, 8 << 20);
        }
    }
}

/// How long the daemon must go without a gRPC call ending before the heap it freed is
/// handed back (short enough that memory drops right after a burst of calls, long enough
/// that a running client such as `ctr run` is not trimmed between each of its calls).
const TRIM_AFTER_QUIET: Duration = Duration::from_millis(200);

/// After each burst of gRPC calls, returns the heap it freed to the kernel: malloc only
/// gives back the top of the heap by itself, while the holes left between live blocks
/// stay resident. Sleeps without a timer while the daemon idles.
async fn release_memory_after_bursts(state: DaemonState) {
    loop {
        state.call_ended().await;
        // Debounce: another call ending restarts the wait.
        loop {
            tokio::select! {
                _ = state.call_ended() => continue,
                _ = tokio::time::sleep(TRIM_AFTER_QUIET) => break,
            }
        }
        release_free_memory();
    }
}

/// Hands the heap's free pages back to the kernel: after start-up (plugin initialisation
/// is a big burst of allocations) and after each burst of calls.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and only returns unused pages.
    unsafe {
        malloc_trim(0);
    }
}

fn create_directory(path: &Path, mode: u32) -> anyhow::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .with_context(|| format!("creating directory {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))
}

/// TLS for the TCP gRPC endpoint, as containerd sets it up: `tcp_tls_cert` and
/// `tcp_tls_key` turn it on; `tcp_tls_ca` in addition requires every client to present a
/// certificate signed by that CA. A key without a certificate (or the reverse) is a
/// configuration error rather than a silently unencrypted endpoint.
fn tcp_tls_config(
    grpc: &crate::config::GrpcConfig,
) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    match (grpc.tcp_tls_cert.is_empty(), grpc.tcp_tls_key.is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {}
        _ => bail!("[grpc] tcp_tls_cert and tcp_tls_key must be set together"),
    }
    let read = |what: &str, path: &str| {
        std::fs::read(path).with_context(|| format!("[grpc] {what}: reading {path}"))
    };
    let identity = Identity::from_pem(
        read("tcp_tls_cert", &grpc.tcp_tls_cert)?,
        read("tcp_tls_key", &grpc.tcp_tls_key)?,
    );
    let mut tls = ServerTlsConfig::new().identity(identity);
    if !grpc.tcp_tls_ca.is_empty() {
        tls = tls.client_ca_root(Certificate::from_pem(read("tcp_tls_ca", &grpc.tcp_tls_ca)?));
    }
    Ok(Some(tls))
}

/// Writes `/proc/self/oom_score_adj`. Lowering it needs CAP_SYS_RESOURCE; without it the
/// daemon runs on with the inherited score (containerd does the same).
fn apply_oom_score(score: i32) {
    let score = score.clamp(-1000, 1000);
    match std::fs::write("/proc/self/oom_score_adj", score.to_string()) {
        Ok(()) => tracing::debug!(score, "OOM score adjusted"),
        Err(e) => tracing::error!(score, error = %e, "failed to change OOM score"),
    }
}

/// Moves the daemon into `[cgroup] path`, creating it if needed, so its memory and CPU
/// are accounted apart from the containers'. As in containerd, a host whose
/// `/sys/fs/cgroup` is the unified (v2) hierarchy gets one cgroup there; any other host
/// (cgroup v1, or hybrid like this project's CI machines) gets the path in every v1
/// hierarchy. Failing is fatal, as in containerd: the operator asked for a placement the
/// daemon cannot honour.
fn join_cgroup(path: &str) -> anyhow::Result<()> {
    const CGROUP_ROOT: &str = "/sys/fs/cgroup";
    let relative = path.trim_start_matches('/');
    if relative.is_empty() || relative.split('/').any(|c| c == "..") {
        bail!("[cgroup] path {path:?} must name a cgroup below the root, without \"..\"");
    }
    let pid = std::process::id().to_string();
    if Path::new(CGROUP_ROOT).join("cgroup.controllers").exists() {
        let directory = Path::new(CGROUP_ROOT).join(relative);
        add_to_cgroup(&directory, &pid)?;
        tracing::info!(cgroup = %directory.display(), "joined cgroup");
        return Ok(());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .context("[cgroup] path: reading /proc/self/mountinfo")?;
    let hierarchies = cgroup_v1_hierarchies(&mountinfo);
    if hierarchies.is_empty() {
        bail!("[cgroup] path {path:?}: no cgroup v1 hierarchy and no cgroup v2 at {CGROUP_ROOT}");
    }
    for (mount_point, options) in &hierarchies {
        let directory = mount_point.join(relative);
        if options.iter().any(|o| o == "cpuset") {
            prepare_cpuset(mount_point, Path::new(relative))?;
        }
        add_to_cgroup(&directory, &pid)?;
    }
    tracing::info!(
        cgroup = path,
        hierarchies = hierarchies.len(),
        "joined cgroup"
    );
    Ok(())
}

fn add_to_cgroup(directory: &Path, pid: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(directory)
        .with_context(|| format!("creating cgroup {}", directory.display()))?;
    std::fs::write(directory.join("cgroup.procs"), pid)
        .with_context(|| format!("moving berthd into cgroup {}", directory.display()))
}

/// Mount points and super options of the cgroup v1 hierarchies in a mountinfo text
/// (`… - cgroup cgroup rw,memory`). cgroup2 mounts (the hybrid `unified` one) are left
/// out, as containerd's v1 manager leaves them out.
fn cgroup_v1_hierarchies(mountinfo: &str) -> Vec<(std::path::PathBuf, Vec<String>)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (fields, tail) = line.split_once(" - ")?;
            let mut tail = tail.split(' ');
            if tail.next()? != "cgroup" {
                return None;
            }
            let options = tail.nth(1)?.split(',').map(str::to_owned).collect();
            let mount_point = fields.split(' ').nth(4)?;
            Some((std::path::PathBuf::from(mount_point), options))
        })
        .collect()
}

/// A new cpuset cgroup starts with no CPUs and no memory nodes, and the kernel refuses
/// to move a task into it; fill every level on the way down from its parent, as
/// containerd's cgroups library does.
fn prepare_cpuset(mount_point: &Path, relative: &Path) -> anyhow::Result<()> {
    let mut parent = mount_point.to_path_buf();
    for component in relative.components() {
        let directory = parent.join(component);
        std::fs::create_dir_all(&directory)
            .with_context(|| format!("creating cgroup {}", directory.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let own = std::fs::read_to_string(directory.join(file)).unwrap_or_default();
            if own.trim().is_empty() {
                let inherited = std::fs::read_to_string(parent.join(file))
                    .with_context(|| format!("reading {}", parent.join(file).display()))?;
                std::fs::write(directory.join(file), inherited.trim())
                    .with_context(|| format!("writing {}", directory.join(file).display()))?;
            }
        }
        parent = directory;
    }
    Ok(())
}

/// This machine's platform in containerd's form (`linux/amd64`, `linux/arm64/v8`).
pub fn host_platform() -> String {
    match std::env::consts::ARCH {
        "x86_64" => "linux/amd64".into(),
        "aarch64" => "linux/arm64/v8".into(),
        "x86" => "linux/386".into(),
        "arm" => "linux/arm/v7".into(),
        "powerpc64" => "linux/ppc64le".into(),
        other => format!("linux/{other}"),
    }
}

/// Sockets the daemon created and removes on exit.
#[derive(Default)]
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn serve(mut config: Config, started: Instant) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "starting berthd"
    );
    opt::normalise_section(&mut config);
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut user1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;

    let ttrpc_address = config.ttrpc_address();
    let daemon = Arc::new(DaemonInfo {
        root: PathBuf::from(&config.root),
        state: PathBuf::from(&config.state),
        grpc_address: config.grpc.address.clone(),
        ttrpc_address: ttrpc_address.clone(),
        platforms: vec![host_platform()],
        max_recv_message_size: config.grpc.max_recv_message_size,
        max_send_message_size: config.grpc.max_send_message_size,
    });
    let message_limits = berth_plugin::MessageLimits::of(&daemon);
    let exchange = Exchange::new();
    let options = InitOptions {
        daemon,
        events: exchange.clone(),
        // `[plugins]` with the top-level `[stream_processors]` merged into the walking
        // differ's section.
        sections: plugins::init_sections(&config),
        disabled: config.disabled_plugins.clone(),
        required: config.required_plugins.clone(),
    };

    // The crates' plugins and one snapshotter per `[proxy_plugins]` entry of type
    // "snapshot".
    let registrations = plugins::daemon_registrations(&config);
    // A plugin may block (a database locked by another daemon); signals still stop us.
    let plugins = tokio::select! {
        result = PluginSet::initialize(registrations, options) => {
            result.map_err(|e| anyhow!("refusing to start: {e}"))?
        }
        _ = terminate.recv() => bail!("terminated while initialising plugins"),
        _ = interrupt.recv() => bail!("interrupted while initialising plugins"),
    };
    let state = DaemonState::new(plugins.records(), exchange.clone());
    let mut sockets = SocketFiles::default();
    let mut side_tasks: Vec<JoinHandle<()>> = Vec::new();

    if !config.debug.address.is_empty() {
        let (listener, path) =
            sockets::listen(&config.debug.address, config.debug.uid, config.debug.gid)
                .context("debug endpoint")?;
        sockets.0.push(path.clone());
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        tracing::info!(address = %path.display(), "serving debug endpoint");
        side_tasks.push(tokio::spawn(endpoints::serve_debug(
            listener,
            state.clone(),
        )));
    }
    if !config.metrics.address.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.metrics.address)
            .await
            .with_context(|| format!("metrics endpoint {}", config.metrics.address))?;
        tracing::info!(address = %config.metrics.address, "serving metrics at /v1/metrics");
        side_tasks.push(tokio::spawn(endpoints::serve_metrics(
            listener,
            state.clone(),
        )));
    }

    let (ttrpc_uid, ttrpc_gid) = config.ttrpc_owner();
    let (ttrpc_listener, ttrpc_path) =
        sockets::listen(&ttrpc_address, ttrpc_uid, ttrpc_gid).context("ttrpc endpoint")?;
    sockets.0.push(ttrpc_path.clone());
    let ttrpc = TtrpcServer::start(ttrpc_listener, exchange.clone())
        .await
        .context("ttrpc endpoint")?;
    tracing::info!(address = %ttrpc_path.display(), "serving ttrpc");

    let routes = grpc_routes(&plugins, message_limits);
    let (stop_grpc, grpc_stopped) = tokio::sync::watch::channel(false);
    let mut grpc_servers = Vec::new();
    if !config.grpc.tcp_address.is_empty() {
        let tls = tcp_tls_config(&config.grpc)?;
        let listener = tokio::net::TcpListener::bind(&config.grpc.tcp_address)
            .await
            .with_context(|| format!("gRPC TCP endpoint {}", config.grpc.tcp_address))?;
        tracing::info!(
            address = %config.grpc.tcp_address,
            tls = tls.is_some(),
            "serving gRPC over TCP"
        );
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        grpc_servers.push(tokio::spawn(crate::grpc::serve(
            routes.clone(),
            incoming,
            wait_for(grpc_stopped.clone()),
            state.clone(),
            tls,
        )));
    }
    let (grpc_listener, grpc_path) =
        sockets::listen(&config.grpc.address, config.grpc.uid, config.grpc.gid)
            .context("gRPC endpoint")?;
    sockets.0.push(grpc_path.clone());
    grpc_listener.set_nonblocking(true)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(
        tokio::net::UnixListener::from_std(grpc_listener)?,
    );
    grpc_servers.push(tokio::spawn(crate::grpc::serve(
        routes,
        incoming,
        wait_for(grpc_stopped),
        state.clone(),
        None,
    )));
    tracing::info!(address = %grpc_path.display(), "serving gRPC");
    let counts = state.plugin_counts();
    tracing::info!(
        plugins_loaded = counts.loaded,
        plugins_failed = counts.failed,
        plugins_skipped = counts.skipped,
        "berthd successfully booted in {:.3}s",
        started.elapsed().as_secs_f64()
    );
    notify::notify("READY=1");
    release_free_memory();
    side_tasks.push(tokio::spawn(release_memory_after_bursts(state.clone())));

    loop {
        tokio::select! {
            _ = user1.recv() => {
                tracing::info!("state dump (SIGUSR1)\n{}", state.dump());
            }
            _ = terminate.recv() => { tracing::info!("received SIGTERM, shutting down"); break; }
            _ = interrupt.recv() => { tracing::info!("received SIGINT, shutting down"); break; }
            finished = futures::future::select_all(grpc_servers.iter_mut()) => {
                let (result, _, _) = finished;
                match result {
                    Ok(Ok(())) => bail!("gRPC server stopped unexpectedly"),
                    Ok(Err(e)) => bail!("gRPC server failed: {e}"),
                    Err(e) => bail!("gRPC server task failed: {e}"),
                }
            }
        }
    }

    // Stop accepting new connections and calls, then give the open ones time to end.
    notify::notify("STOPPING=1");
    let _ = stop_grpc.send(true);
    for path in &sockets.0 {
        let _ = std::fs::remove_file(path);
    }
    let graceful = async {
        for server in grpc_servers {
            let _ = server.await;
        }
        ttrpc.shutdown().await;
    };
    tokio::select! {
        _ = graceful => tracing::info!("all calls finished"),
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "calls still open after the grace period; closing them");
        }
        _ = terminate.recv() => tracing::warn!("second SIGTERM: closing open calls now"),
        _ = interrupt.recv() => tracing::warn!("second SIGINT: closing open calls now"),
    }
    for task in side_tasks {
        task.abort();
    }
    drop(sockets);
    tracing::info!("berthd stopped");
    Ok(())
}

async fn wait_for(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Every loaded gRPC plugin's services on one router.
fn grpc_routes(plugins: &PluginSet, limits: berth_plugin::MessageLimits) -> tonic::service::Routes {
    let mut builder = tonic::service::RoutesBuilder::default();
    for (id, service) in plugins.get_all::<Arc<dyn GrpcService>>(types::GRPC) {
        tracing::debug!(plugin = %id, "registering gRPC service");
        service.register(&mut builder, limits);
    }
    builder.routes()
}
