//! A small CRI client timing the pod lifecycle the kubelet drives, for comparing berthd
//! with containerd 1.6 (CRI enabled) on the same machine (bench/cri-pods.sh):
//!
//! ```text
//! cri_pods <socket> <daemon pid> <dir> <cgroup parent> <image> [ROUNDS (10)] [PODS (10)]
//! ```
//!
//! `dir` (which the daemon must see) gets the pods' log directories; `image` is the
//! container image (a busybox, present in `k8s.io`); the sandbox image is the daemon's.
//!
//! One round, not counted, then ROUNDS rounds of one pod each: RunPodSandbox (unique
//! name and uid, `cgroup_parent`, DNS config, log directory), CreateContainer (`sleep
//! 3600`, its own PID namespace, a log path), StartContainer, ExecSync (`true`),
//! StopContainer (timeout 0: SIGKILL), RemoveContainer, StopPodSandbox,
//! RemovePodSandbox, each timed around its gRPC call; `ready_to_running` is
//! RunPodSandbox's start to StartContainer's return, `container_gone` StopContainer +
//! RemoveContainer, `pod_gone` StopPodSandbox + RemovePodSandbox (the daemons split the
//! work between stop and remove differently). Then PODS pods started at once
//! (each RunPodSandbox, CreateContainer, StartContainer; concurrently, as the kubelet's
//! pod workers), ListPodSandbox, ListContainers and ListContainerStats timed with them
//! running (20 calls each), the daemon's VmRSS and its shims' (the processes whose
//! command line names `socket` after `-address`) RSS and PSS, then all torn down at once.
//!
//! Output, for scripts (milliseconds, KiB):
//!
//! ```text
//! round <i> <step> <ms> <step> <ms> …
//! step <step> median <ms> min <ms> max <ms> n <n>
//! pods <n> <key> <value> …
//! ```

use berth_cri::api;
use berth_cri::api::runtime_service_client::RuntimeServiceClient;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

type Client = RuntimeServiceClient<Channel>;
type Error = Box<dyn std::error::Error + Send + Sync>;

const STEPS: [&str; 12] = [
    "run_pod",
    "create",
    "start",
    "exec",
    "stop",
    "remove",
    "stop_pod",
    "remove_pod",
    "ready_to_running",
    "container_gone",
    "pod_gone",
    "round",
];
const LIST_CALLS: usize = 20;

struct Setup {
    dir: String,
    cgroup_parent: String,
    image: String,
    run: String,
}

impl Setup {
    fn sandbox(&self, name: &str) -> api::PodSandboxConfig {
        let uid = format!("{}-{name}", self.run);
        api::PodSandboxConfig {
            metadata: Some(api::PodSandboxMetadata {
                name: name.into(),
                uid: uid.clone(),
                namespace: "bench".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: format!("{}/{uid}", self.dir),
            dns_config: Some(api::DnsConfig {
                servers: vec!["10.96.0.10".into()],
                searches: vec!["bench.svc.cluster.local".into()],
                options: vec!["ndots:5".into()],
            }),
            labels: [("app".to_string(), name.to_string())].into(),
            linux: Some(api::LinuxPodSandboxConfig {
                cgroup_parent: self.cgroup_parent.clone(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn container(&self) -> api::ContainerConfig {
        api::ContainerConfig {
            metadata: Some(api::ContainerMetadata {
                name: "app".into(),
                attempt: 0,
            }),
            image: Some(api::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: ["sleep", "3600"].map(String::from).into(),
            log_path: "app/0.log".into(),
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
}

/// Times one call, in milliseconds.
async fn timed<T, F: Future<Output = Result<T, tonic::Status>>>(
    what: &str,
    call: F,
) -> Result<(T, f64), Error> {
    let started = Instant::now();
    let out = call.await.map_err(|s| format!("{what}: {s}"))?;
    Ok((out, ms(started.elapsed())))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A pod with one running container; the times of the calls that made it.
struct Pod {
    id: String,
    container: String,
    times: Vec<(&'static str, f64)>,
}

async fn start_pod(mut c: Client, setup: &Setup, name: &str) -> Result<Pod, Error> {
    let config = setup.sandbox(name);
    std::fs::create_dir_all(&config.log_directory)?; // the kubelet makes it
    let started = Instant::now();
    let (r, run) = timed(
        "RunPodSandbox",
        c.run_pod_sandbox(api::RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        }),
    )
    .await?;
    let id = r.into_inner().pod_sandbox_id;
    let mut pod = Pod {
        id,
        container: String::new(),
        times: vec![("run_pod", run)],
    };
    let result = async {
        let (r, create) = timed(
            "CreateContainer",
            c.create_container(api::CreateContainerRequest {
                pod_sandbox_id: pod.id.clone(),
                config: Some(setup.container()),
                sandbox_config: Some(config),
            }),
        )
        .await?;
        pod.container = r.into_inner().container_id;
        let (_, start) = timed(
            "StartContainer",
            c.start_container(api::StartContainerRequest {
                container_id: pod.container.clone(),
            }),
        )
        .await?;
        pod.times.push(("create", create));
        pod.times.push(("start", start));
        pod.times.push(("ready_to_running", ms(started.elapsed())));
        Ok::<_, Error>(())
    }
    .await;
    match result {
        Ok(()) => Ok(pod),
        Err(e) => {
            let _ = stop_pod(c, &pod).await;
            Err(e)
        }
    }
}

/// StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox; their times.
async fn stop_pod(mut c: Client, pod: &Pod) -> Result<Vec<(&'static str, f64)>, Error> {
    let mut times = Vec::new();
    if !pod.container.is_empty() {
        let id = pod.container.clone();
        let (_, t) = timed(
            "StopContainer",
            c.stop_container(api::StopContainerRequest {
                container_id: id.clone(),
                timeout: 0,
            }),
        )
        .await?;
        times.push(("stop", t));
        let (_, t) = timed(
            "RemoveContainer",
            c.remove_container(api::RemoveContainerRequest { container_id: id }),
        )
        .await?;
        times.push(("remove", t));
    }
    let id = pod.id.clone();
    let (_, t) = timed(
        "StopPodSandbox",
        c.stop_pod_sandbox(api::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        }),
    )
    .await?;
    times.push(("stop_pod", t));
    let (_, t) = timed(
        "RemovePodSandbox",
        c.remove_pod_sandbox(api::RemovePodSandboxRequest { pod_sandbox_id: id }),
    )
    .await?;
    times.push(("remove_pod", t));
    Ok(times)
}

async fn round(c: &Client, setup: &Setup, name: &str) -> Result<Vec<(&'static str, f64)>, Error> {
    let started = Instant::now();
    let mut pod = start_pod(c.clone(), setup, name).await?;
    let exec = timed(
        "ExecSync",
        c.clone().exec_sync(api::ExecSyncRequest {
            container_id: pod.container.clone(),
            cmd: vec!["true".into()],
            timeout: 10,
        }),
    )
    .await;
    let stopped = stop_pod(c.clone(), &pod).await?;
    let (r, t) = exec?;
    let r = r.into_inner();
    if r.exit_code != 0 {
        return Err(format!("ExecSync true: exit code {}", r.exit_code).into());
    }
    pod.times.push(("exec", t));
    let t = |step| {
        stopped
            .iter()
            .find(|(s, _)| *s == step)
            .map_or(0.0, |(_, t)| *t)
    };
    let gone = [t("stop") + t("remove"), t("stop_pod") + t("remove_pod")];
    pod.times.extend(stopped);
    pod.times.push(("container_gone", gone[0]));
    pod.times.push(("pod_gone", gone[1]));
    pod.times.push(("round", ms(started.elapsed())));
    Ok(pod.times)
}

/// (median, min, max)
fn summary(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    field_kib(&status, "VmRSS:")
}

fn field_kib(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The shims of the daemon on `socket`: their count, summed RSS and PSS (KiB).
fn shims(socket: &str) -> (usize, u64, u64) {
    let needle = format!("\0-address\0{socket}\0");
    let (mut n, mut rss, mut pss) = (0, 0, 0);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&needle) {
            continue;
        }
        let rollup = std::fs::read_to_string(path.join("smaps_rollup")).unwrap_or_default();
        n += 1;
        rss += field_kib(&rollup, "Rss:");
        pss += field_kib(&rollup, "Pss:");
    }
    (n, rss, pss)
}

/// The median of LIST_CALLS calls of ListPodSandbox, ListContainers, ListContainerStats.
async fn list_medians(client: &Client) -> Result<[f64; 3], Error> {
    let mut medians = [0.0; 3];
    for (which, median) in medians.iter_mut().enumerate() {
        let mut times = Vec::with_capacity(LIST_CALLS);
        for _ in 0..LIST_CALLS {
            let mut c = client.clone();
            let t = match which {
                0 => {
                    timed(
                        "ListPodSandbox",
                        c.list_pod_sandbox(api::ListPodSandboxRequest::default()),
                    )
                    .await?
                    .1
                }
                1 => {
                    timed(
                        "ListContainers",
                        c.list_containers(api::ListContainersRequest::default()),
                    )
                    .await?
                    .1
                }
                _ => {
                    let call = c.list_container_stats(api::ListContainerStatsRequest::default());
                    timed("ListContainerStats", call).await?.1
                }
            };
            times.push(t);
        }
        *median = summary(times).0;
    }
    Ok(medians)
}

fn usage() -> ! {
    eprintln!(
        "usage: cri_pods <socket> <daemon pid> <dir> <cgroup parent> <image> [ROUNDS (10)] [PODS (10)]"
    );
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(5..=7).contains(&args.len()) {
        usage();
    }
    let number = |i: usize, default: usize| match args.get(i) {
        Some(a) => a.parse().ok().filter(|&n| n > 0).unwrap_or_else(|| usage()),
        None => default,
    };
    let (rounds, pods) = (number(5, 10), number(6, 10));
    let pid: u32 = args[1].parse().unwrap_or_else(|_| usage());
    let socket = args[0].clone();
    let setup = Setup {
        dir: args[2].clone(),
        cgroup_parent: args[3].clone(),
        image: args[4].clone(),
        run: format!("{:x}", std::process::id()),
    };
    let client = RuntimeServiceClient::new(berth_services::proxy::unix_channel(&socket)?);
    // Connected before the clock starts, as the kubelet is (it begins with Version).
    client
        .clone()
        .version(api::VersionRequest::default())
        .await?;

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    for i in 0..=rounds {
        let times = round(&client, &setup, &format!("pod-{i}")).await?;
        let line: Vec<String> = times.iter().map(|(s, t)| format!("{s} {t:.3}")).collect();
        println!("round {i} {}", line.join(" "));
        if i == 0 {
            continue; // the first: binaries and images paged in
        }
        for (step, t) in times {
            samples[STEPS.iter().position(|s| *s == step).unwrap()].push(t);
        }
    }
    for (step, v) in STEPS.iter().zip(samples) {
        let (median, min, max) = summary(v);
        println!("step {step} median {median:.3} min {min:.3} max {max:.3} n {rounds}");
    }

    // PODS pods at once.
    let rss_before = vm_rss_kib(pid);
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let setup = std::sync::Arc::new(setup);
    for i in 0..pods {
        let (c, setup) = (client.clone(), setup.clone());
        set.spawn(async move { start_pod(c, &setup, &format!("many-{i}")).await });
    }
    let mut running = Vec::new();
    let mut failed = None;
    for r in set.join_all().await {
        match r {
            Ok(pod) => running.push(pod),
            Err(e) => failed = Some(e),
        }
    }
    let start_all = ms(started.elapsed());
    let mut out = vec![("start_all_ms".to_string(), format!("{start_all:.3}"))];
    if failed.is_none() {
        let ready: Vec<f64> = running.iter().map(|p| p.times[3].1).collect();
        let (median, min, max) = summary(ready);
        out.push(("ready_to_running_median".into(), format!("{median:.3}")));
        out.push(("ready_to_running_min".into(), format!("{min:.3}")));
        out.push(("ready_to_running_max".into(), format!("{max:.3}")));
        let [pods_ms, containers_ms, stats_ms] = list_medians(&client).await?;
        out.push(("list_pods_ms".into(), format!("{pods_ms:.3}")));
        out.push(("list_containers_ms".into(), format!("{containers_ms:.3}")));
        out.push(("list_stats_ms".into(), format!("{stats_ms:.3}")));
        let (n, rss, pss) = shims(&socket);
        out.push(("rss_before_kib".into(), rss_before.to_string()));
        out.push(("rss_running_kib".into(), vm_rss_kib(pid).to_string()));
        out.push(("shims".into(), n.to_string()));
        out.push(("shims_rss_kib".into(), rss.to_string()));
        out.push(("shims_pss_kib".into(), pss.to_string()));
    }
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for pod in running {
        let c = client.clone();
        set.spawn(async move { stop_pod(c, &pod).await });
    }
    for r in set.join_all().await {
        r?;
    }
    if let Some(e) = failed {
        return Err(e);
    }
    out.push((
        "stop_all_ms".into(),
        format!("{:.3}", ms(started.elapsed())),
    ));
    out.push(("rss_after_kib".into(), vm_rss_kib(pid).to_string()));
    let line: Vec<String> = out.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("pods {pods} {}", line.join(" "));
    Ok(())
}
