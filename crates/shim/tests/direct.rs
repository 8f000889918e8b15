//! The shim driven directly over its ttrpc task API, the way a runtime manager (containerd,
//! later berthd) does: `start` action, then Create/Start/State/Pids/Stats/Update/Pause/
//! Resume/Exec/Wait/Kill/Delete/Connect/Shutdown, with a fake events service on
//! TTRPC_ADDRESS recording what the shim forwards. Needs root, runc and a static busybox.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use containerd_shim_protos::api;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim::oci::Options;
use containerd_shim_protos::ttrpc::{self, context};
use containerd_shim_protos::types::task::Status;
use containerd_shim_protos::{Events, TaskClient};

const SHIM: &str = env!("CARGO_BIN_EXE_containerd-shim-berth-v2");
const NS: &str = "berth-direct";

fn have(bin: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(bin))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(String, String, String)>>, // (namespace, topic, type_url)
}

impl Events for Recorder {
    fn forward(
        &self,
        _ctx: &ttrpc::TtrpcContext,
        req: ForwardRequest,
    ) -> ttrpc::Result<api::Empty> {
        let e = req.envelope.unwrap_or_default();
        let url = e
            .event
            .as_ref()
            .map(|a| a.type_url.clone())
            .unwrap_or_default();
        self.events
            .lock()
            .unwrap()
            .push((e.namespace, e.topic, url));
        Ok(api::Empty::new())
    }
}

struct Guard {
    dir: PathBuf,
    id: String,
    runc_root: PathBuf,
    shim_pid: Option<u32>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
        if let Some(p) = self.shim_pid {
            unsafe { libc::kill(p as i32, libc::SIGKILL) };
        }
        // Anything else still running from our directory (a shim whose pid was not read yet).
        berth_testkit::kill_processes_under(&self.dir);
        let rootfs = self.dir.join("bundle/rootfs");
        for _ in 0..4 {
            let c = std::ffi::CString::new(rootfs.to_string_lossy().as_bytes()).unwrap();
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                break;
            }
        }
        // runc's cgroups for the container (cgroupfs: /<id> under every hierarchy).
        for h in std::fs::read_dir("/sys/fs/cgroup")
            .into_iter()
            .flatten()
            .flatten()
        {
            let _ = std::fs::remove_dir(h.path().join(&self.id));
        }
        let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&self.id));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx() -> context::Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

#[test]
fn task_api_over_ttrpc() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the direct shim test needs root (runc, mounts); run it as root, as CI does"
    );
    let runc = have("runc").expect("runc not found in PATH: run scripts/install-deps");
    let busybox = std::env::var_os("BUSYBOX_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/usr/bin/busybox".into());
    assert!(
        busybox.exists(),
        "no static busybox at {}: run scripts/install-deps (busybox-static) or set BUSYBOX_BIN",
        busybox.display()
    );
    let dir = std::env::temp_dir().join(format!("berth-shim-direct-{}", std::process::id()));
    let id = format!("berth-direct-{}", std::process::id());
    let mut guard = Guard {
        dir: dir.clone(),
        id: id.clone(),
        runc_root: dir.join("runc-root"),
        shim_pid: None,
    };
    let _ = std::fs::remove_dir_all(&dir);
    let bundle = dir.join("bundle");
    let src = dir.join("rootfs-src");
    std::fs::create_dir_all(src.join("bin")).unwrap();
    std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
    for d in ["proc", "dev", "sys", "tmp"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::copy(&busybox, src.join("bin/busybox")).unwrap();
    for a in ["sh", "sleep", "echo", "cat", "true"] {
        std::os::unix::fs::symlink("busybox", src.join("bin").join(a)).unwrap();
    }
    // A stock spec from `runc spec`, made non-interactive.
    let st = Command::new(&runc)
        .arg("spec")
        .current_dir(&bundle)
        .status()
        .unwrap();
    assert!(st.success());
    let spec = std::fs::read_to_string(bundle.join("config.json")).unwrap();
    let spec = spec
        .replace("\"terminal\": true", "\"terminal\": false")
        .replace(
            "\"args\": [\n\t\t\t\"sh\"\n\t\t]",
            "\"args\": [\"sh\", \"-c\", \"echo started; exec sleep 1000\"]",
        );
    assert!(
        spec.contains("exec sleep 1000"),
        "unexpected runc spec layout"
    );
    std::fs::write(bundle.join("config.json"), spec).unwrap();

    // The fake daemon side: an events service on TTRPC_ADDRESS.
    let events_sock = dir.join("events.sock");
    let rec = Arc::new(Recorder::default());
    let svc: Arc<dyn Events + Send + Sync> = rec.clone();
    let mut server = ttrpc::Server::new()
        .bind(&format!("unix://{}", events_sock.display()))
        .unwrap()
        .register_service(containerd_shim_protos::create_events(svc));
    server.start().unwrap();

    // `start` action.
    let out = Command::new(SHIM)
        .args([
            "-namespace",
            NS,
            "-address",
            &dir.join("daemon.sock").to_string_lossy(),
            "-publish-binary",
            "/bin/false",
            "-id",
            &id,
            "start",
        ])
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", &events_sock)
        .env("BERTH_SHIM_SOCKET_DIR", dir.join("s"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let address = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(address.starts_with("unix:///"), "{address}");
    assert_eq!(
        std::fs::read_to_string(bundle.join("address")).unwrap(),
        address
    );
    let mode = std::fs::metadata(dir.join("s"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    let shim_pid: u32 = std::fs::read_to_string(bundle.join("shim.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    guard.shim_pid = Some(shim_pid);

    let client = TaskClient::new(ttrpc::Client::connect(&address).unwrap());

    let mut c = api::ConnectRequest::new();
    c.id = id.clone();
    let r = client.connect(ctx(), &c).unwrap();
    assert_eq!(r.shim_pid, shim_pid);

    // Create, with runc options (root) and a file:// stdout, rootfs as a bind mount.
    let mut opts = Options::new();
    opts.root = guard.runc_root.to_string_lossy().into_owned();
    let mut any = Any::new();
    any.type_url = "containerd.runc.v1.Options".into();
    any.value = opts.write_to_bytes().unwrap();
    let out_file = dir.join("out.txt");
    let mut req = api::CreateTaskRequest::new();
    req.id = id.clone();
    req.bundle = bundle.to_string_lossy().into_owned();
    req.stdout = format!("file://{}", out_file.display());
    req.stderr = req.stdout.clone();
    req.options = MessageField::some(any);
    let mut m = api::Mount::new();
    m.type_ = "bind".into();
    m.source = src.to_string_lossy().into_owned();
    m.options = vec!["rbind".into(), "rw".into()];
    req.rootfs = vec![m];
    let created = client.create(ctx(), &req).unwrap();
    assert!(created.pid > 0);
    // The runtime root from the options is used (runc keeps its state there).
    assert!(guard.runc_root.join(NS).join(&id).exists());

    let state = |exec: &str| {
        let mut s = api::StateRequest::new();
        s.id = id.clone();
        s.exec_id = exec.into();
        client.state(ctx(), &s).unwrap()
    };
    assert_eq!(state("").status.enum_value(), Ok(Status::CREATED));

    let mut s = api::StartRequest::new();
    s.id = id.clone();
    let started = client.start(ctx(), &s).unwrap();
    assert_eq!(started.pid, created.pid);
    assert_eq!(state("").status.enum_value(), Ok(Status::RUNNING));

    let t = Instant::now();
    while std::fs::read_to_string(&out_file).unwrap_or_default() != "started\n"
        && t.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&out_file).unwrap(), "started\n");

    let mut p = api::PidsRequest::new();
    p.id = id.clone();
    let pids = client.pids(ctx(), &p).unwrap();
    assert!(pids.processes.iter().any(|x| x.pid == created.pid));

    // Update the memory limit, then see it in Stats.
    let mut u = api::UpdateTaskRequest::new();
    u.id = id.clone();
    let mut res = Any::new();
    res.type_url = "opencontainers/runtime-spec/1/LinuxResources".into();
    res.value = br#"{"memory":{"limit":67108864}}"#.to_vec();
    u.resources = MessageField::some(res);
    client.update(ctx(), &u).unwrap();
    let mut sr = api::StatsRequest::new();
    sr.id = id.clone();
    let stats = client.stats(ctx(), &sr).unwrap();
    let any = stats.stats.into_option().expect("stats");
    match any.type_url.as_str() {
        "io.containerd.cgroups.v1.Metrics" => {
            let m = containerd_shim_protos::cgroups::metrics::Metrics::parse_from_bytes(&any.value)
                .unwrap();
            assert_eq!(m.memory.usage.limit, 67108864);
            assert!(m.pids.current >= 1);
        }
        "io.containerd.cgroups.v2.Metrics" => {
            let m =
                containerd_shim_protos::cgroups_v2::metrics::Metrics::parse_from_bytes(&any.value)
                    .unwrap();
            assert_eq!(m.memory.usage_limit, 67108864);
        }
        other => panic!("unexpected metrics type {other}"),
    }

    let mut pr = api::PauseRequest::new();
    pr.id = id.clone();
    client.pause(ctx(), &pr).unwrap();
    assert_eq!(state("").status.enum_value(), Ok(Status::PAUSED));
    let mut rr = api::ResumeRequest::new();
    rr.id = id.clone();
    client.resume(ctx(), &rr).unwrap();
    assert_eq!(state("").status.enum_value(), Ok(Status::RUNNING));

    // Exec.
    let exec_out = dir.join("exec.txt");
    let mut e = api::ExecProcessRequest::new();
    e.id = id.clone();
    e.exec_id = "ex1".into();
    e.stdout = format!("file://{}", exec_out.display());
    let mut spec = Any::new();
    spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    spec.value = br#"{"args":["sh","-c","echo exec-out; exit 9"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#.to_vec();
    e.spec = MessageField::some(spec);
    client.exec(ctx(), &e).unwrap();
    assert!(
        client.exec(ctx(), &e).is_err(),
        "a second exec with the same id must fail"
    );
    let mut s = api::StartRequest::new();
    s.id = id.clone();
    s.exec_id = "ex1".into();
    let ep = client.start(ctx(), &s).unwrap();
    assert!(ep.pid > 0);
    let mut w = api::WaitRequest::new();
    w.id = id.clone();
    w.exec_id = "ex1".into();
    assert_eq!(client.wait(ctx(), &w).unwrap().exit_status, 9);
    assert_eq!(std::fs::read_to_string(&exec_out).unwrap(), "exec-out\n");
    let mut d = api::DeleteRequest::new();
    d.id = id.clone();
    d.exec_id = "ex1".into();
    assert_eq!(client.delete(ctx(), &d).unwrap().exit_status, 9);

    // A terminal exec whose stdout is a binary:// logger (stock ctr ignores --log-uri
    // with -t, so this path is driven here): the pty's output reaches the logger's fd 3.
    let logged = dir.join("logged");
    std::fs::create_dir_all(&logged).unwrap();
    let logger = dir.join("logger.sh");
    std::fs::write(
        &logger,
        format!(
            "#!/bin/sh\nexec 5>&-\n/bin/cat <&3 > {0}/out.part\n/bin/mv {0}/out.part {0}/out\n",
            logged.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&logger, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut e = api::ExecProcessRequest::new();
    e.id = id.clone();
    e.exec_id = "tty1".into();
    e.terminal = true;
    e.stdout = format!("binary://{}", logger.display());
    let mut spec = Any::new();
    spec.type_url = "types.containerd.io/opencontainers/runtime-spec/1/Process".into();
    spec.value = br#"{"terminal":true,"args":["/bin/busybox","tty"],"cwd":"/","env":["PATH=/bin"],"user":{"uid":0,"gid":0}}"#.to_vec();
    e.spec = MessageField::some(spec);
    client.exec(ctx(), &e).unwrap();
    let mut s = api::StartRequest::new();
    s.id = id.clone();
    s.exec_id = "tty1".into();
    client.start(ctx(), &s).unwrap();
    let mut w = api::WaitRequest::new();
    w.id = id.clone();
    w.exec_id = "tty1".into();
    assert_eq!(client.wait(ctx(), &w).unwrap().exit_status, 0);
    let t = Instant::now();
    while !logged.join("out").exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let tty = std::fs::read_to_string(logged.join("out")).unwrap_or_default();
    assert!(tty.starts_with("/dev/pts/"), "the logger got {tty:?}");
    let mut d = api::DeleteRequest::new();
    d.id = id.clone();
    d.exec_id = "tty1".into();
    client.delete(ctx(), &d).unwrap();

    // Deleting a running task is refused; kill, wait, delete.
    let mut d = api::DeleteRequest::new();
    d.id = id.clone();
    assert!(client.delete(ctx(), &d).is_err());
    let mut k = api::KillRequest::new();
    k.id = id.clone();
    k.signal = 9;
    client.kill(ctx(), &k).unwrap();
    let mut w = api::WaitRequest::new();
    w.id = id.clone();
    let waited = client.wait(ctx(), &w).unwrap();
    assert_eq!(waited.exit_status, 137);
    assert!(waited.exited_at.is_some());
    assert_eq!(state("").status.enum_value(), Ok(Status::STOPPED));
    // Killing a finished process: not found.
    assert!(client.kill(ctx(), &k).is_err());
    let del = client.delete(ctx(), &d).unwrap();
    assert_eq!((del.pid, del.exit_status), (created.pid, 137));
    assert!(
        !guard.runc_root.join(NS).join(&id).exists(),
        "runc state left behind"
    );
    let mounted = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounted.contains(&*bundle.join("rootfs").to_string_lossy()),
        "rootfs still mounted"
    );

    let mut sd = api::ShutdownRequest::new();
    sd.id = id.clone();
    let _ = client.shutdown(ctx(), &sd);
    let t = Instant::now();
    let alive = || {
        std::fs::read_to_string(format!("/proc/{shim_pid}/stat"))
            .map(|s| s.split_whitespace().nth(2) != Some("Z"))
            .unwrap_or(false)
    };
    while alive() && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(), "shim did not exit after Shutdown");
    assert!(
        !Path::new(address.trim_start_matches("unix://")).exists(),
        "socket left behind"
    );

    let ev = rec.events.lock().unwrap().clone();
    let topics: Vec<&str> = ev.iter().map(|e| e.1.as_str()).collect();
    assert!(ev.iter().all(|e| e.0 == NS), "{ev:?}");
    for (topic, url) in [
        ("/tasks/create", "containerd.events.TaskCreate"),
        ("/tasks/start", "containerd.events.TaskStart"),
        ("/tasks/paused", "containerd.events.TaskPaused"),
        ("/tasks/resumed", "containerd.events.TaskResumed"),
        ("/tasks/exec-added", "containerd.events.TaskExecAdded"),
        ("/tasks/exec-started", "containerd.events.TaskExecStarted"),
        ("/tasks/exit", "containerd.events.TaskExit"),
        ("/tasks/delete", "containerd.events.TaskDelete"),
    ] {
        assert!(
            ev.iter().any(|e| e.1 == topic && e.2 == url),
            "no {topic} ({url}) in {topics:?}"
        );
    }
    let pos = |t: &str| topics.iter().position(|x| *x == t).unwrap();
    assert!(
        pos("/tasks/create") < pos("/tasks/start") && pos("/tasks/start") < pos("/tasks/delete"),
        "{topics:?}"
    );
    // Three exits (two execs, then init); the last one comes before the delete.
    assert_eq!(
        topics.iter().filter(|t| **t == "/tasks/exit").count(),
        3,
        "{topics:?}"
    );
    assert!(topics.iter().rposition(|t| *t == "/tasks/exit").unwrap() < pos("/tasks/delete"));
    guard.shim_pid = None;
    server.shutdown();
}

#[test]
fn delete_action_prints_a_delete_response() {
    let dir = std::env::temp_dir().join(format!("berth-shim-delete-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("init.pid"), "4242").unwrap();
    std::fs::write(
        dir.join("options.json"),
        r#"{"binary_name":"/bin/true","root":""}"#,
    )
    .unwrap();
    let out = Command::new(SHIM)
        .args([
            "-namespace",
            NS,
            "-address",
            "/nonexistent.sock",
            "-publish-binary",
            "/bin/false",
            "-id",
            "gone",
        ])
        .arg("-bundle")
        .arg(&dir)
        .arg("delete")
        .current_dir(&dir)
        .env("BERTH_SHIM_SOCKET_DIR", dir.join("s"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = api::DeleteResponse::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!((r.pid, r.exit_status), (4242, 137));
    assert!(r.exited_at.is_some());
}

#[test]
fn bad_invocations_fail_cleanly() {
    let out = Command::new(SHIM)
        .args(["-bogus", "start"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(SHIM)
        .args(["-namespace", "x", "start"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("id"));
    let out = Command::new(SHIM).arg("-v").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("io.containerd.berth.v2"));
}
