//! Pod sandboxes and containers through the CRI, as the kubelet drives them: a private
//! berthd with real shims and OCI runtimes, the CNI plugins Debian installs in
//! `/usr/lib/cni` (bridge + host-local + loopback) on a private bridge and subnet, the
//! fixture `pause` and `busybox` images imported into `k8s.io` (no network but the
//! bridge). Each test removes what it made: the daemon's processes, mounts and
//! network namespaces (with its directory), its bridge, and its cgroups and runtime
//! roots. Skipped (saying so) when not root or when the CNI plugins are missing.

use berth_cri::api;
use berth_cri::api::runtime_service_client::RuntimeServiceClient;
use berth_testkit::Daemon;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::Code;
use tonic::transport::Channel;

const CNI_BIN: &str = "/usr/lib/cni";
const PAUSE: &str = "import.local/pause:latest";
const BUSYBOX: &str = "import.local/busybox:latest";

fn skip() -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIP: CRI pod tests need root");
        return true;
    }
    if !Path::new(CNI_BIN).join("bridge").exists() {
        eprintln!(
            "SKIP: no CNI plugins in {CNI_BIN} (scripts/install-deps installs containernetworking-plugins)"
        );
        return true;
    }
    false
}

/// A daemon with a private CNI network, removing its bridge and cgroups at the end.
struct Env {
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
    bridge: String,
    subnet_prefix: String,
    cgroup_parent: String,
}

impl Env {
    fn start() -> Env {
        Self::start_with(true)
    }

    fn start_with(network: bool) -> Env {
        Self::start_full(network, None)
    }

    /// `registry`: the sandbox image is not imported but pulled from this registry
    /// (plain HTTP through a hosts directory) as `<registry>/fixtures/pause:1`.
    fn start_full(network: bool, registry: Option<&berth_testkit::registry::Registry>) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("bcri-")
            .tempdir_in("/tmp")
            .unwrap();
        let rand = uuid::Uuid::new_v4().simple().to_string();
        let bridge = format!("bcri{}", &rand[..8]);
        let bytes = uuid::Uuid::new_v4().into_bytes();
        let subnet_prefix = format!("10.{}.{}", 200 + bytes[0] % 50, bytes[1]);
        let conf_dir = dir.path().join("net.d");
        std::fs::create_dir_all(&conf_dir).unwrap();
        // Without a network config, a template for UpdateRuntimeConfig to render.
        let template = dir.path().join("template.conflist");
        std::fs::write(
            &template,
            r#"{"cniVersion":"0.4.0","name":"from-template","plugins":[{"type":"host-local-only","subnet":"{{.PodCIDR}}"}]}"#,
        )
        .unwrap();
        if network {
            let conf = serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "berth-test",
                "plugins": [{
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": false,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("{subnet_prefix}.0/24")}]],
                        "dataDir": dir.path().join("ipam"),
                    }
                }]
            });
            std::fs::write(conf_dir.join("10-test.conflist"), conf.to_string()).unwrap();
        }
        let (sandbox_image, registry_config) = match registry {
            Some(r) => {
                let host = r.host();
                let hosts = dir.path().join("hosts");
                std::fs::create_dir_all(hosts.join(&host)).unwrap();
                std::fs::write(
                    hosts.join(&host).join("hosts.toml"),
                    format!("server = \"http://{host}\"\n"),
                )
                .unwrap();
                (
                    format!("{host}/fixtures/pause:1"),
                    format!(
                        "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = {:?}\n",
                        hosts.display()
                    ),
                )
            }
            None => (PAUSE.to_string(), String::new()),
        };
        let config = format!(
            "{registry_config}[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = {sandbox_image:?}\n  restrict_oom_score_adj = true\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = {CNI_BIN:?}\n  conf_dir = {:?}\n  conf_template = {:?}\n",
            conf_dir.display(),
            template.display()
        );
        let daemon = Daemon::start_with_config(&config);
        let fixtures = berth_testkit::fixtures();
        let images: &[&str] = if registry.is_some() {
            &["busybox"]
        } else {
            &["pause", "busybox"]
        };
        for image in images {
            let archive = fixtures.join(format!("{image}.oci.tar"));
            daemon.ctr_ok(&[
                "-n",
                "k8s.io",
                "images",
                "import",
                &archive.to_string_lossy(),
            ]);
        }
        Env {
            daemon: Some(daemon),
            dir,
            bridge,
            subnet_prefix,
            cgroup_parent: format!("/bcri-{}", &rand[8..20]),
        }
    }

    fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().unwrap()
    }

    fn client(&self) -> RuntimeServiceClient<Channel> {
        let socket = self
            .daemon
            .as_ref()
            .unwrap()
            .socket
            .to_string_lossy()
            .into_owned();
        RuntimeServiceClient::new(berth_services::proxy::unix_channel(&socket).unwrap())
    }

    fn log_dir(&self) -> PathBuf {
        self.dir.path().join("logs")
    }

    fn netns_dir(&self) -> PathBuf {
        self.daemon
            .as_ref()
            .unwrap()
            .state
            .join("io.containerd.grpc.v1.cri/netns")
    }

    fn netns_files(&self) -> usize {
        std::fs::read_dir(self.netns_dir())
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// IPs host-local has handed out and not released.
    fn allocated_ips(&self) -> Vec<String> {
        std::fs::read_dir(self.dir.path().join("ipam/berth-test"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn sandbox_config(&self, name: &str) -> api::PodSandboxConfig {
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "testns".into(),
                attempt: 0,
            }),
            hostname: format!("{name}-host"),
            log_directory: self.log_dir().join(name).display().to_string(),
            dns_config: Some(api::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["testns.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            labels: [("app".to_string(), name.to_string())].into(),
            annotations: [("note".to_string(), "a".to_string())].into(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(d) = &self.daemon
        {
            eprintln!("daemon log tail:\n{}", berth_testkit::tail(&d.log(), 60));
        }
        // The daemon first (its processes, mounts and netns files), then the host side:
        // a failed test may leave containers running in this test's own cgroup parent.
        let daemon_dir = self
            .daemon
            .as_ref()
            .map(|d| d.dir.path().display().to_string());
        drop(self.daemon.take());
        kill_cgroup_tree(&self.cgroup_parent);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        if let Some(dir) = daemon_dir {
            remove_runtime_states(&format!("{dir}/"));
        }
        berth_testkit::remove_runtime_leftovers("k8s.io", &self.cgroup_parent);
        remove_v2_tree(&self.cgroup_parent);
    }
}

/// Where a cgroup path lives: every v1 hierarchy, the hybrid `unified` one, and the
/// v2 root itself.
fn cgroup_bases() -> Vec<PathBuf> {
    let mut bases = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
        for h in hierarchies.flatten() {
            if h.path().is_dir() {
                bases.push(h.path());
                bases.push(h.path().join("unified"));
            }
        }
    }
    bases
}

/// Removes the (empty) cgroup tree `parent` on a v2 host, which
/// `remove_runtime_leftovers` (v1 hierarchies) does not look at.
fn remove_v2_tree(parent: &str) {
    fn remove(dir: &Path) {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    remove(&e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
    }
    let rel = parent.trim_start_matches('/');
    if !rel.is_empty() && !rel.contains("..") {
        remove(&Path::new("/sys/fs/cgroup").join(rel));
    }
}

/// After a failed test: the OCI runtimes' state directories of this test's containers
/// (their `state.json` names the bundle in the daemon's directory, `needle`; their
/// processes are dead by now).
fn remove_runtime_states(needle: &str) {
    for root in ["/run/containerd/runc/k8s.io", "/run/berth-runc/k8s.io"] {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for e in entries.flatten() {
            let state = std::fs::read_to_string(e.path().join("state.json")).unwrap_or_default();
            if state.contains(needle) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// SIGKILLs every process in the cgroup tree `parent` (this test's own) until none is
/// left.
fn kill_cgroup_tree(parent: &str) {
    fn pids(dir: &Path, out: &mut Vec<i32>) {
        if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    pids(&e.path(), out);
                }
            }
        }
    }
    let rel = parent.trim_start_matches('/');
    for _ in 0..50 {
        let mut found = Vec::new();
        for base in cgroup_bases() {
            pids(&base.join(rel), &mut found);
        }
        if found.is_empty() {
            return;
        }
        for pid in found {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn container_config(name: &str, command: &[&str]) -> api::ContainerConfig {
    api::ContainerConfig {
        metadata: Some(api::ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(api::ImageSpec {
            image: BUSYBOX.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        labels: [("c".to_string(), name.to_string())].into(),
        // The kubelet's default: a PID namespace of the container's own.
        linux: Some(api::LinuxContainerConfig {
            security_context: Some(api::LinuxContainerSecurityContext {
                namespace_options: Some(api::NamespaceOption {
                    pid: api::NamespaceMode::Container as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn run_pod(
    client: &mut RuntimeServiceClient<Channel>,
    config: &api::PodSandboxConfig,
) -> String {
    client
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_or_else(|s| panic!("RunPodSandbox: {s:?}"))
        .into_inner()
        .pod_sandbox_id
}

async fn create_start(
    client: &mut RuntimeServiceClient<Channel>,
    pod: &str,
    sandbox: &api::PodSandboxConfig,
    config: api::ContainerConfig,
) -> String {
    let id = client
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.into(),
            config: Some(config),
            sandbox_config: Some(sandbox.clone()),
        })
        .await
        .unwrap_or_else(|s| panic!("CreateContainer: {s:?}"))
        .into_inner()
        .container_id;
    client
        .start_container(api::StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|s| panic!("StartContainer: {s:?}"));
    id
}

async fn status(client: &mut RuntimeServiceClient<Channel>, id: &str) -> api::ContainerStatus {
    client
        .container_status(api::ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap_or_else(|s| panic!("ContainerStatus: {s:?}"))
        .into_inner()
        .status
        .unwrap()
}

async fn wait_exited(client: &mut RuntimeServiceClient<Channel>, id: &str) -> api::ContainerStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = status(client, id).await;
        if s.state == api::ContainerState::ContainerExited as i32 {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "container {id} did not exit: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn exec(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
    cmd: &[&str],
) -> api::ExecSyncResponse {
    client
        .exec_sync(api::ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 10,
        })
        .await
        .unwrap_or_else(|s| panic!("ExecSync {cmd:?}: {s:?}"))
        .into_inner()
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.unwrap_err().code()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn sandbox_status(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> api::PodSandboxStatus {
    client
        .pod_sandbox_status(api::PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        })
        .await
        .unwrap_or_else(|s| panic!("PodSandboxStatus: {s:?}"))
        .into_inner()
        .status
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_life_network_exec_logs_stop_and_remove() {
    if skip() {
        return;
    }
    let env = Env::start();
    let mut client = env.client();
    let st = client
        .status(api::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let network = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(network.status, "{network:?}");

    let sandbox = env.sandbox_config("pod1");
    let pod = run_pod(&mut client, &sandbox).await;
    assert_eq!(pod.len(), 64);
    let sb = sandbox_status(&mut client, &pod).await;
    assert_eq!(sb.state, api::PodSandboxState::SandboxReady as i32);
    let ip = sb.network.unwrap().ip;
    assert!(
        ip.starts_with(&format!("{}.", env.subnet_prefix)),
        "pod IP {ip}"
    );
    assert_eq!(sb.labels["app"], "pod1");
    assert_eq!(env.netns_files(), 1);
    assert_eq!(env.allocated_ips(), vec![ip.clone()]);

    // The same name again is refused while the first holds it.
    let dup = client
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert!(dup.message().contains("is reserved for"), "{dup:?}");

    let c = create_start(
        &mut client,
        &pod,
        &sandbox,
        container_config(
            "app",
            &[
                "sh",
                "-c",
                "echo hello-out; echo hello-err >&2; exec sleep 1000",
            ],
        ),
    )
    .await;
    let s = status(&mut client, &c).await;
    assert_eq!(s.state, api::ContainerState::ContainerRunning as i32);
    assert!(s.image_ref.starts_with("sha256:"), "{s:?}");

    let out = exec(&mut client, &c, &["hostname"]).await;
    assert_eq!(
        (text(&out.stdout), out.exit_code),
        ("pod1-host\n".to_string(), 0)
    );
    let out = exec(&mut client, &c, &["cat", "/etc/resolv.conf"]).await;
    assert_eq!(
        text(&out.stdout),
        "search testns.svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n"
    );
    let out = exec(&mut client, &c, &["ip", "addr", "show", "eth0"]).await;
    assert!(
        text(&out.stdout).contains(&format!("inet {ip}/24")),
        "{}",
        text(&out.stdout)
    );
    let out = exec(&mut client, &c, &["sh", "-c", "echo to-err >&2; exit 3"]).await;
    assert_eq!(
        (text(&out.stderr), out.exit_code),
        ("to-err\n".to_string(), 3)
    );

    // Stats from the task's cgroup metrics and the snapshot's usage.
    let stats = client
        .container_stats(api::ContainerStatsRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .stats
        .unwrap();
    assert!(stats.cpu.unwrap().usage_core_nano_seconds.unwrap().value > 0);
    assert!(stats.memory.unwrap().working_set_bytes.unwrap().value > 0);
    assert!(
        stats
            .writable_layer
            .unwrap()
            .fs_id
            .unwrap()
            .mountpoint
            .ends_with("io.containerd.snapshotter.v1.overlayfs")
    );
    let all = client
        .list_container_stats(api::ListContainerStatsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .stats;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].attributes.as_ref().unwrap().id, c);

    // The stock ctr sees the pause and app containers and their tasks in k8s.io.
    let daemon = env.daemon.as_ref().unwrap();
    let listed = daemon.ctr_ok(&["-n", "k8s.io", "containers", "ls"]);
    assert!(listed.contains(&pod) && listed.contains(&c), "{listed}");
    let tasks = daemon.ctr_ok(&["-n", "k8s.io", "tasks", "ls"]);
    assert_eq!(
        tasks.lines().filter(|l| l.contains("RUNNING")).count(),
        2,
        "{tasks}"
    );
    let info = daemon.ctr_ok(&["-n", "k8s.io", "containers", "info", &pod]);
    assert!(
        info.contains("\"io.cri-containerd.kind\": \"sandbox\""),
        "{info}"
    );
    // containerd's -998 for the pause, raised to the daemon's own score by
    // `restrict_oom_score_adj` (this host may not lower scores).
    let own_score: i64 =
        std::fs::read_to_string(format!("/proc/{}/oom_score_adj", daemon.pid().unwrap()))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["Spec"]["process"]["oomScoreAdj"].as_i64(),
        Some((-998).max(own_score)),
        "{info}"
    );

    // CRI log lines.
    let log = env.log_dir().join("pod1/app.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().count() >= 2 || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut seen: Vec<(String, String, String)> = lines
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.splitn(4, ' ').collect();
            assert!(
                f[0].ends_with('Z') && f[0].contains('T'),
                "timestamp in {l:?}"
            );
            (f[1].to_string(), f[2].to_string(), f[3].to_string())
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("stderr".into(), "F".into(), "hello-err".into()),
            ("stdout".into(), "F".into(), "hello-out".into())
        ]
    );

    // The kubelet rotates the log, then asks for it to be reopened: new lines go to a
    // new file at the same path.
    let rotated = log.with_extension("log.1");
    std::fs::rename(&log, &rotated).unwrap();
    client
        .reopen_container_log(api::ReopenContainerLogRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap();
    assert!(log.exists());
    let out = exec(
        &mut client,
        &c,
        &["sh", "-c", "echo after-rotation > /proc/1/fd/1"],
    )
    .await;
    assert_eq!(out.exit_code, 0, "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("stdout F after-rotation")
    {
        assert!(Instant::now() < deadline, "no line in the reopened log");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !std::fs::read_to_string(&rotated)
            .unwrap()
            .contains("after-rotation")
    );

    // `sleep` as PID 1 ignores SIGTERM: the stop escalates to SIGKILL after the timeout.
    let start = Instant::now();
    client
        .stop_container(api::StopContainerRequest {
            container_id: c.clone(),
            timeout: 1,
        })
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_secs(1));
    let s = status(&mut client, &c).await;
    assert_eq!(s.state, api::ContainerState::ContainerExited as i32);
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "Error"));
    assert!(s.finished_at >= s.started_at && s.started_at >= s.created_at);
    assert_eq!(s.log_path, log.display().to_string());

    client
        .remove_container(api::RemoveContainerRequest {
            container_id: c.clone(),
        })
        .await
        .unwrap();
    let list = client
        .list_containers(api::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.containers.is_empty());

    client
        .stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    let sb = sandbox_status(&mut client, &pod).await;
    assert_eq!(sb.state, api::PodSandboxState::SandboxNotready as i32);
    // Filters: by state, label and ID prefix.
    let filtered = |filter: api::PodSandboxFilter| {
        let mut client = client.clone();
        async move {
            client
                .list_pod_sandbox(api::ListPodSandboxRequest {
                    filter: Some(filter),
                })
                .await
                .unwrap()
                .into_inner()
                .items
                .len()
        }
    };
    let state = |s: api::PodSandboxState| Some(api::PodSandboxStateValue { state: s as i32 });
    assert_eq!(
        filtered(api::PodSandboxFilter {
            state: state(api::PodSandboxState::SandboxNotready),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        filtered(api::PodSandboxFilter {
            state: state(api::PodSandboxState::SandboxReady),
            ..Default::default()
        })
        .await,
        0
    );
    let labels = |v: &str| [("app".to_string(), v.to_string())].into();
    assert_eq!(
        filtered(api::PodSandboxFilter {
            label_selector: labels("pod1"),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(
        filtered(api::PodSandboxFilter {
            label_selector: labels("other"),
            ..Default::default()
        })
        .await,
        0
    );
    assert_eq!(
        filtered(api::PodSandboxFilter {
            id: pod[..12].to_string(),
            ..Default::default()
        })
        .await,
        1
    );
    assert_eq!(env.netns_files(), 0, "the network namespace is gone");
    assert!(env.allocated_ips().is_empty(), "host-local released the IP");
    // Stop and remove are idempotent.
    client
        .stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    for _ in 0..2 {
        client
            .remove_pod_sandbox(api::RemovePodSandboxRequest {
                pod_sandbox_id: pod.clone(),
            })
            .await
            .unwrap();
    }
    let list = client
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.items.is_empty());
    let listed = daemon.ctr_ok(&["-n", "k8s.io", "containers", "ls", "-q"]);
    assert!(listed.trim().is_empty(), "{listed}");
    // The name is free again.
    let again = run_pod(&mut client, &sandbox).await;
    client
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: again,
        })
        .await
        .unwrap();
    assert_eq!(env.netns_files(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_network_exits_security_context_and_exec_timeout() {
    if skip() {
        return;
    }
    let env = Env::start();
    let mut client = env.client();
    let sandbox = env.sandbox_config("pod2");
    let pod = run_pod(&mut client, &sandbox).await;

    // Two containers share the pod's network namespace: one listens, the other
    // reaches it on 127.0.0.1 (the pod's own loopback, which CNI's loopback plugin set up).
    let server = create_start(
        &mut client,
        &pod,
        &sandbox,
        container_config(
            "server",
            &["sh", "-c", "while true; do echo pong | nc -l -p 8080; done"],
        ),
    )
    .await;
    // Each container has its own environment (containerd once leaked one container's
    // into the next) and a host path mounted read-only.
    let host_dir = env.dir.path().join("hostpath");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(host_dir.join("f"), "from the host\n").unwrap();
    let mut cc = container_config("client", &["sleep", "1000"]);
    cc.envs = vec![api::KeyValue {
        key: "ONLY_CLIENT".into(),
        value: "1".into(),
    }];
    cc.mounts = vec![api::Mount {
        container_path: "/data".into(),
        host_path: host_dir.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let clientc = create_start(&mut client, &pod, &sandbox, cc).await;
    let out = exec(&mut client, &server, &["env"]).await;
    assert!(
        !text(&out.stdout).contains("ONLY_CLIENT"),
        "{}",
        text(&out.stdout)
    );
    let out = exec(&mut client, &clientc, &["env"]).await;
    assert!(text(&out.stdout).contains("ONLY_CLIENT=1"));
    assert!(text(&out.stdout).contains("HOSTNAME=pod2-host"));
    let out = exec(&mut client, &clientc, &["cat", "/data/f"]).await;
    assert_eq!(text(&out.stdout), "from the host\n");
    let out = exec(&mut client, &clientc, &["touch", "/data/new"]).await;
    assert_ne!(out.exit_code, 0);
    assert!(!host_dir.join("new").exists());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = exec(
            &mut client,
            &clientc,
            &["sh", "-c", "echo ping | nc -w 1 127.0.0.1 8080"],
        )
        .await;
        if text(&out.stdout).contains("pong") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no answer from the other container: {out:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Exits: non-zero is an Error, zero Completed.
    let failing = create_start(
        &mut client,
        &pod,
        &sandbox,
        container_config("fails", &["sh", "-c", "exit 3"]),
    )
    .await;
    let s = wait_exited(&mut client, &failing).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (3, "Error"));
    let ok = create_start(
        &mut client,
        &pod,
        &sandbox,
        container_config("ok", &["true"]),
    )
    .await;
    let s = wait_exited(&mut client, &ok).await;
    assert_eq!((s.exit_code, s.reason.as_str()), (0, "Completed"));
    let exec_err = client
        .exec_sync(api::ExecSyncRequest {
            container_id: ok.clone(),
            cmd: vec!["true".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert!(
        exec_err.message().contains("CONTAINER_EXITED"),
        "{exec_err:?}"
    );

    // A memory limit the container goes over: the OOM killer ends it, reason OOMKilled.
    let mut hog = container_config("hog", &["tail", "/dev/zero"]);
    hog.linux.as_mut().unwrap().resources = Some(api::LinuxContainerResources {
        memory_limit_in_bytes: 32 << 20,
        ..Default::default()
    });
    let hog = create_start(&mut client, &pod, &sandbox, hog).await;
    let s = wait_exited(&mut client, &hog).await;
    // The event may trail the exit by a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = s;
    while s.reason != "OOMKilled" && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        s = status(&mut client, &hog).await;
    }
    assert_eq!((s.exit_code, s.reason.as_str()), (137, "OOMKilled"));

    // run_as_user, run_as_group and a read-only root file system.
    let mut secure = container_config("secure", &["sleep", "1000"]);
    let sc = secure
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sc.run_as_user = Some(api::Int64Value { value: 1000 });
    sc.run_as_group = Some(api::Int64Value { value: 2000 });
    sc.readonly_rootfs = true;
    let secure = create_start(&mut client, &pod, &sandbox, secure).await;
    let out = exec(&mut client, &secure, &["sh", "-c", "id -u; id -g"]).await;
    assert_eq!(text(&out.stdout), "1000\n2000\n");
    let out = exec(&mut client, &secure, &["touch", "/newfile"]).await;
    assert_ne!(out.exit_code, 0);
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    let out = exec(
        &mut client,
        &secure,
        &["sh", "-c", "echo x > /dev/shm/f && cat /dev/shm/f"],
    )
    .await;
    assert_eq!(text(&out.stdout), "x\n", "/dev/shm stays writable");

    // IDs beyond 2^31-1 are refused, never wrapped to root (CVE-2024-40635).
    let mut wide = container_config("wide", &["id"]);
    wide.linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap()
        .run_as_user = Some(api::Int64Value { value: 1 << 32 });
    let err = client
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(wide),
            sandbox_config: Some(sandbox.clone()),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // UpdateContainerResources reaches the running task's cgroup (and its record).
    client
        .update_container_resources(api::UpdateContainerResourcesRequest {
            container_id: clientc.clone(),
            linux: Some(api::LinuxContainerResources {
                memory_limit_in_bytes: 64 << 20,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let rel = format!("{}/{clientc}", env.cgroup_parent.trim_start_matches('/'));
    let limit =
        std::fs::read_to_string(format!("/sys/fs/cgroup/memory/{rel}/memory.limit_in_bytes"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/{rel}/memory.max")))
            .unwrap();
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let info =
        env.daemon
            .as_ref()
            .unwrap()
            .ctr_ok(&["-n", "k8s.io", "containers", "info", &clientc]);
    assert!(
        info.contains(&format!("\"limit\": {}", 64u64 << 20)),
        "{info}"
    );

    // ExecSync's timeout.
    let start = Instant::now();
    let err = client
        .exec_sync(api::ExecSyncRequest {
            container_id: clientc.clone(),
            cmd: vec!["sleep".into(), "30".into()],
            timeout: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(10));

    // Filters.
    let list = client
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                state: Some(api::ContainerStateValue {
                    state: api::ContainerState::ContainerExited as i32,
                }),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let mut exited: Vec<String> = list.containers.into_iter().map(|c| c.id).collect();
    exited.sort();
    let mut expected = vec![failing.clone(), ok.clone(), hog.clone()];
    expected.sort();
    assert_eq!(exited, expected);
    let list = client
        .list_containers(api::ListContainersRequest {
            filter: Some(api::ContainerFilter {
                label_selector: [("c".to_string(), "server".to_string())].into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.containers.len(), 1);
    assert_eq!(list.containers[0].id, server);

    // Removing the sandbox stops and removes everything in it.
    client
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap();
    let list = client
        .list_containers(api::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.containers.is_empty());
    assert_eq!(env.netns_files(), 0);
    assert!(env.allocated_ips().is_empty());
    let tasks = env
        .daemon
        .as_ref()
        .unwrap()
        .ctr_ok(&["-n", "k8s.io", "tasks", "ls", "-q"]);
    assert!(tasks.trim().is_empty(), "{tasks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_pod_survives_a_daemon_restart() {
    if skip() {
        return;
    }
    let mut env = Env::start();
    let mut client = env.client();
    let sandbox = env.sandbox_config("pod3");
    let pod = run_pod(&mut client, &sandbox).await;
    let c = create_start(
        &mut client,
        &pod,
        &sandbox,
        container_config("app", &["sh", "-c", "echo before; exec sleep 1000"]),
    )
    .await;
    let ip = sandbox_status(&mut client, &pod).await.network.unwrap().ip;

    env.daemon().restart();
    let mut client = env.client();
    let list = client
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.items.len(), 1);
    assert_eq!(list.items[0].id, pod);
    let sb = sandbox_status(&mut client, &pod).await;
    assert_eq!(sb.state, api::PodSandboxState::SandboxReady as i32);
    assert_eq!(sb.network.unwrap().ip, ip);
    let s = status(&mut client, &c).await;
    assert_eq!(s.state, api::ContainerState::ContainerRunning as i32);
    let out = exec(&mut client, &c, &["hostname"]).await;
    assert_eq!(text(&out.stdout), "pod3-host\n");
    // The same name is still reserved after the restart.
    let dup = client
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(sandbox.clone()),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert!(dup.message().contains("is reserved for"), "{dup:?}");

    client
        .stop_container(api::StopContainerRequest {
            container_id: c.clone(),
            timeout: 0,
        })
        .await
        .unwrap();
    let s = status(&mut client, &c).await;
    assert_eq!(
        (s.state, s.exit_code),
        (api::ContainerState::ContainerExited as i32, 137)
    );
    client
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    assert_eq!(env.netns_files(), 0);
    assert!(env.allocated_ips().is_empty());
    let listed = env
        .daemon
        .as_ref()
        .unwrap()
        .ctr_ok(&["-n", "k8s.io", "containers", "ls", "-q"]);
    assert!(listed.trim().is_empty(), "{listed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_bad_input_and_unbuilt_rpcs() {
    if skip() {
        return;
    }
    // No CNI config: the network is not ready, as containerd says.
    let env = Env::start_with(false);
    let mut client = env.client();
    let st = client
        .status(api::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let network = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(!network.status);
    assert_eq!(network.reason, "NetworkPluginNotReady");
    assert!(
        network.message.contains("cni plugin not initialized"),
        "{}",
        network.message
    );
    // A sandbox cannot be networked then, and nothing of it is left.
    let err = client
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(env.sandbox_config("nonet")),
            runtime_handler: String::new(),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("cni plugin not initialized"),
        "{err:?}"
    );
    assert_eq!(env.netns_files(), 0);
    let list = client
        .list_pod_sandbox(api::ListPodSandboxRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.items.is_empty());
    let err = client
        .run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(env.sandbox_config("h")),
            runtime_handler: "kata".into(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("no runtime for \"kata\""), "{err:?}");

    // The kubelet's pod CIDR renders conf_template into conf_dir: the network is ready.
    client
        .update_runtime_config(api::UpdateRuntimeConfigRequest {
            runtime_config: Some(api::RuntimeConfig {
                network_config: Some(api::NetworkConfig {
                    pod_cidr: "10.244.7.0/24".into(),
                }),
            }),
        })
        .await
        .unwrap();
    let rendered =
        std::fs::read_to_string(env.dir.path().join("net.d/10-containerd-net.conflist")).unwrap();
    assert!(
        rendered.contains(r#""subnet":"10.244.7.0/24""#),
        "{rendered}"
    );
    let st = client
        .status(api::StatusRequest { verbose: false })
        .await
        .unwrap()
        .into_inner();
    let network = st
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.r#type == "NetworkReady")
        .unwrap();
    assert!(network.status, "{network:?}");

    let unknown = "0".repeat(64);
    assert_eq!(
        code(
            client
                .pod_sandbox_status(api::PodSandboxStatusRequest {
                    pod_sandbox_id: unknown.clone(),
                    verbose: false
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .stop_pod_sandbox(api::StopPodSandboxRequest {
                    pod_sandbox_id: unknown.clone()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .container_status(api::ContainerStatusRequest {
                    container_id: unknown.clone(),
                    verbose: false
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .stop_container(api::StopContainerRequest {
                    container_id: unknown.clone(),
                    timeout: 1
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .start_container(api::StartContainerRequest {
                    container_id: unknown.clone()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            client
                .exec_sync(api::ExecSyncRequest {
                    container_id: unknown.clone(),
                    cmd: vec!["true".into()],
                    timeout: 1
                })
                .await
        ),
        Code::NotFound
    );
    let create = client
        .create_container(api::CreateContainerRequest {
            pod_sandbox_id: unknown.clone(),
            config: Some(container_config("x", &["true"])),
            sandbox_config: None,
        })
        .await;
    assert_eq!(code(create), Code::NotFound);
    // Removing what is not there succeeds.
    client
        .remove_container(api::RemoveContainerRequest {
            container_id: unknown.clone(),
        })
        .await
        .unwrap();
    client
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: unknown.clone(),
        })
        .await
        .unwrap();
    // What is not built says so.
    let err = client
        .exec(api::ExecRequest {
            container_id: unknown.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let err = client
        .attach(api::AttachRequest {
            container_id: unknown.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    let err = client
        .port_forward(api::PortForwardRequest {
            pod_sandbox_id: unknown,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_pod_with_the_sandbox_image_pulled() {
    if skip() {
        return;
    }
    if !berth_testkit::registry::have_registry() {
        eprintln!("SKIP: skopeo or docker-registry missing (scripts/install-deps)");
        return;
    }
    let registry = berth_testkit::registry::Registry::start();
    registry.push_oci_archive(
        &berth_testkit::fixtures().join("pause.oci.tar"),
        "fixtures/pause:1",
    );
    // No CNI config at all: a pod on the node's network needs none.
    let env = Env::start_full(false, Some(&registry));
    let mut client = env.client();
    let mut sandbox = env.sandbox_config("hostnet");
    sandbox.hostname = String::new();
    sandbox.dns_config = None;
    let linux = sandbox.linux.as_mut().unwrap();
    linux.security_context = Some(api::LinuxSandboxSecurityContext {
        namespace_options: Some(api::NamespaceOption {
            network: api::NamespaceMode::Node as i32,
            ..Default::default()
        }),
        ..Default::default()
    });
    let pod = run_pod(&mut client, &sandbox).await;
    // The sandbox image was pulled (a CRI-managed record of the registry's name).
    let images = env
        .daemon
        .as_ref()
        .unwrap()
        .ctr_ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(
        images.lines().any(|l| l.ends_with("/fixtures/pause:1")),
        "{images}"
    );
    let sb = sandbox_status(&mut client, &pod).await;
    assert_eq!(sb.state, api::PodSandboxState::SandboxReady as i32);
    assert_eq!(sb.network.unwrap().ip, "");
    assert_eq!(
        sb.linux
            .unwrap()
            .namespaces
            .unwrap()
            .options
            .unwrap()
            .network,
        api::NamespaceMode::Node as i32
    );
    assert_eq!(
        env.netns_files(),
        0,
        "no network namespace for a host-network pod"
    );

    let c = create_start(
        &mut client,
        &pod,
        &sandbox,
        container_config("app", &["sleep", "1000"]),
    )
    .await;
    // The node's hostname, network namespace and resolv.conf.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let out = exec(&mut client, &c, &["hostname"]).await;
    assert_eq!(text(&out.stdout).trim(), host_name.trim());
    let out = exec(&mut client, &c, &["readlink", "/proc/self/ns/net"]).await;
    let host_ns = std::fs::read_link("/proc/self/ns/net").unwrap();
    assert_eq!(text(&out.stdout).trim(), host_ns.display().to_string());
    let out = exec(&mut client, &c, &["cat", "/etc/resolv.conf"]).await;
    assert_eq!(
        text(&out.stdout),
        std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()
    );

    client
        .remove_pod_sandbox(api::RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap();
    let list = client
        .list_containers(api::ListContainersRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(list.containers.is_empty());
}
