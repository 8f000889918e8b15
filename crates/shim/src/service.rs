//! The task service (`containerd.task.v2.Task`) for one container and its exec processes.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim_protos::api::{self, Empty};
use containerd_shim_protos::events::task as ev;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageField};
use containerd_shim_protos::shim::oci::{CheckpointOptions, Options, ProcessDetails};
use containerd_shim_protos::ttrpc::{self, Code, TtrpcContext};
use containerd_shim_protos::types::task::{ProcessInfo, Status};

use crate::cgroups::Cgroups;
use crate::events::Publisher;
use crate::monitor::{Monitor, Msg};
use crate::runc::{self, Runtime, Stdios};
use crate::stdio::{self, IoConfig, ProcIo};
use crate::{mounts, sys};

type TResult<T> = ttrpc::Result<T>;

fn err(code: Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn internal(e: impl std::fmt::Display) -> ttrpc::Error {
    err(Code::INTERNAL, e.to_string())
}

fn not_found(what: &str) -> ttrpc::Error {
    err(Code::NOT_FOUND, format!("{what}: not found"))
}

struct Proc {
    exec_id: String,
    pid: u32,
    status: Status,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    io_cfg: IoConfig,
    io: ProcIo,
    spec: Option<PathBuf>,
}

impl Proc {
    fn new(exec_id: &str, io_cfg: IoConfig) -> Proc {
        Proc {
            exec_id: exec_id.into(),
            pid: 0,
            status: Status::CREATED,
            exit_status: 0,
            exited_at: None,
            io_cfg,
            io: ProcIo::default(),
            spec: None,
        }
    }

    fn exited(&mut self, code: u32) {
        self.status = Status::STOPPED;
        self.exit_status = code;
        self.exited_at = Some(sys::now());
        self.io.close_stdin();
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    runtime: Runtime,
    rootfs: Option<PathBuf>,
    cgroups: Cgroups,
    init: Proc,
    execs: HashMap<String, Proc>,
    /// The container has no pid namespace of its own: when its init exits, the rest of
    /// its processes must be killed explicitly (the kernel does it otherwise).
    shares_pid_ns: bool,
}

impl Container {
    fn process(&mut self, exec_id: &str) -> TResult<&mut Proc> {
        if exec_id.is_empty() {
            Ok(&mut self.init)
        } else {
            self.execs
                .get_mut(exec_id)
                .ok_or_else(|| not_found(&format!("process {exec_id}")))
        }
    }
}

#[derive(Default)]
struct State {
    container: Option<Container>,
    seq: u32,
}

impl State {
    fn container(&mut self, id: &str) -> TResult<&mut Container> {
        match self.container.as_mut() {
            Some(c) if c.id == id => Ok(c),
            _ => Err(not_found(&format!("container {id}"))),
        }
    }
}

pub struct Service {
    namespace: String,
    socket_dir: PathBuf,
    /// This shim's own socket, removed before `Shutdown` is answered.
    socket: PathBuf,
    mon: Arc<Monitor>,
    events: Arc<Publisher>,
    tx: Mutex<Sender<Msg>>,
    state: Mutex<State>,
    cv: Condvar,
}

impl Service {
    pub fn new(
        namespace: &str,
        socket_dir: PathBuf,
        socket: PathBuf,
        mon: Arc<Monitor>,
        events: Arc<Publisher>,
        tx: Sender<Msg>,
    ) -> Service {
        Service {
            namespace: namespace.into(),
            socket_dir,
            socket,
            mon,
            events,
            tx: Mutex::new(tx),
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn console_path(&self, st: &mut State) -> PathBuf {
        st.seq += 1;
        let name = sys::hash_hex(&[&std::process::id().to_string(), &st.seq.to_string()]);
        self.socket_dir.join(format!("{}.pty", &name[..16]))
    }

    /// Called on the main thread for every exit of a process the shim did not run itself.
    pub fn handle_exit(&self, pid: i32, status: i32) {
        let mut st = self.lock();
        let code = sys::exit_code(status);
        if let Some(c) = st.container.as_mut() {
            let cid = c.id.clone();
            let procs = std::iter::once(&mut c.init).chain(c.execs.values_mut());
            for p in procs {
                if p.pid as i32 == pid && p.exited_at.is_none() {
                    p.exited(code);
                    let mut e = ev::TaskExit::new();
                    e.container_id = cid.clone();
                    e.id = if p.exec_id.is_empty() {
                        cid.clone()
                    } else {
                        p.exec_id.clone()
                    };
                    e.pid = p.pid;
                    e.exit_status = code;
                    e.exited_at = MessageField::from_option(p.exited_at.clone());
                    self.events.publish(&e);
                    if p.exec_id.is_empty() && c.shares_pid_ns {
                        let _ = c.runtime.run(
                            &self.mon,
                            &["kill", "--all", &cid, "9"],
                            Stdios::default(),
                        );
                    }
                    break;
                }
            }
        }
        // An unknown pid: a reparented orphan or a publish helper. Processes the shim starts
        // are registered under the state lock before their exit can be handled here (the
        // handler that starts one holds the lock until its pid is recorded), so an exit is
        // never early; unknown ones are simply dropped (no pid-reuse confusion later).
        self.cv.notify_all();
    }

    pub fn handle_oom(&self, container_id: &str) {
        let mut e = ev::TaskOOM::new();
        e.container_id = container_id.into();
        self.events.publish(&e);
    }

    /// Spawns a runtime command that may hand back a pty (create / exec) and waits for it.
    fn run_with_io(
        &self,
        rt: &Runtime,
        args: &[&str],
        prep: &mut stdio::Prepared,
    ) -> TResult<Option<std::fs::File>> {
        let mut cmd = rt.command(args);
        let s = prep.take_stdios();
        cmd.stdin(
            s.stdin
                .map(std::process::Stdio::from)
                .unwrap_or_else(std::process::Stdio::null),
        );
        cmd.stdout(
            s.stdout
                .map(std::process::Stdio::from)
                .unwrap_or_else(std::process::Stdio::null),
        );
        cmd.stderr(
            s.stderr
                .map(std::process::Stdio::from)
                .unwrap_or_else(std::process::Stdio::null),
        );
        let child = self.mon.spawn(&mut cmd).map_err(internal)?;
        drop(cmd);
        let pid = child.id() as i32;
        let (master, exited) = match prep.receive_console(&self.mon, pid) {
            Ok(r) => r,
            Err(e) => {
                let _ = self.mon.wait(pid);
                return Err(internal(format!("receiving the console: {e}")));
            }
        };
        let status = exited.unwrap_or_else(|| self.mon.wait(pid));
        if status != 0 {
            let out = runc::Output {
                status,
                stdout: vec![],
                stderr: vec![],
            };
            return Err(internal(rt.error(args[0], &out)));
        }
        if prep.console.is_some() && master.is_none() {
            return Err(internal("the runtime sent no console"));
        }
        Ok(master)
    }

    fn do_create(&self, st: &mut State, req: &api::CreateTaskRequest) -> TResult<Container> {
        let bundle = PathBuf::from(&req.bundle);
        let mut opts = Options::new();
        if let Some(a) = req.options.as_ref() {
            if a.type_url.ends_with("containerd.runc.v1.Options") {
                opts = Options::parse_from_bytes(&a.value)
                    .map_err(|e| err(Code::INVALID_ARGUMENT, format!("runc options: {e}")))?;
            } else if a.type_url.ends_with("runtimeoptions.v1.Options") {
                (opts.binary_name, opts.root) = runc::parse_runtime_options(&a.value)
                    .map_err(|e| err(Code::INVALID_ARGUMENT, format!("runtime options: {e}")))?;
            }
        }
        crate::cgroups::warm_up_cgroup_attach();
        if opts.binary_name.is_empty() {
            let (name, not_berth_runc) = runc::default_runtime(&bundle);
            if let Some(why) = not_berth_runc {
                slog!("{}: runc instead of berth-runc: {why}", req.id);
            }
            opts.binary_name = name;
        }
        runc::write_options(&bundle, &opts.binary_name, &opts.root).map_err(internal)?;
        let rt = Runtime::new(&opts.binary_name, &opts.root, &self.namespace, &bundle)
            .map_err(|e| err(Code::FAILED_PRECONDITION, e.to_string()))?;
        let rootfs = bundle.join("rootfs");
        let mounted = if req.rootfs.is_empty() {
            None
        } else {
            mounts::mount_all(&req.rootfs, &rootfs).map_err(internal)?;
            Some(rootfs.clone())
        };
        let io_cfg = IoConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let result = (|| {
            let mut prep =
                stdio::prepare(&io_cfg, &self.console_path(st), &req.id, &self.namespace)
                    .map_err(internal)?;
            let pidfile = bundle.join("init.pid");
            let pidfile_s = pidfile.to_string_lossy().into_owned();
            let bundle_s = bundle.to_string_lossy().into_owned();
            let mut args = vec!["create", "--bundle", &bundle_s, "--pid-file", &pidfile_s];
            let cs;
            if let Some(c) = &prep.console {
                cs = c.path.to_string_lossy().into_owned();
                args.extend(["--console-socket", &cs]);
            }
            if opts.no_pivot_root {
                args.push("--no-pivot");
            }
            if opts.no_new_keyring {
                args.push("--no-new-keyring");
            }
            args.push(&req.id);
            let master = match self.run_with_io(&rt, &args, &mut prep) {
                Ok(m) => m,
                Err(e) => {
                    prep.abort();
                    return Err(e);
                }
            };
            if let Some(m) = &master {
                sys::apply_console_size(m.as_raw_fd(), &bundle.join("config.json"));
            }
            let pid: u32 = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| internal("the runtime wrote no pid file"))?;
            let io = prep.finish(master).map_err(internal)?;
            Ok((pid, io))
        })();
        let (pid, io) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Some(r) = &mounted {
                    sys::unmount_all(r);
                }
                return Err(e);
            }
        };
        let mut init = Proc::new("", io_cfg);
        init.pid = pid;
        init.io = io;
        let cgroups = Cgroups::of_pid(pid);
        let watched = match (cgroups.memory_v1(), &cgroups.v2) {
            (Some(m), _) => self.mon.watch_oom_v1(&req.id, m.clone()),
            (None, Some(d)) => self.mon.watch_oom_v2(&req.id, d.clone()),
            _ => Ok(()),
        };
        if let Err(e) = watched {
            slog!("no OOM notifications for {}: {e}", req.id);
        }
        let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        let shares_pid_ns = ns(&pid.to_string()).is_some() && ns(&pid.to_string()) == ns("self");
        Ok(Container {
            shares_pid_ns,
            id: req.id.clone(),
            bundle,
            runtime: rt,
            rootfs: mounted,
            cgroups,
            init,
            execs: HashMap::new(),
        })
    }

    fn start_exec(&self, st: &mut State, id: &str, exec_id: &str) -> TResult<u32> {
        let path = self.console_path(st);
        let c = st.container(id)?;
        let (rt, bundle) = (c.runtime.clone(), c.bundle.clone());
        if c.init.exited_at.is_some() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {id} is not running"),
            ));
        }
        let p = c.process(exec_id)?;
        if p.status != Status::CREATED {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("process {exec_id} was already started"),
            ));
        }
        let spec = p.spec.clone().unwrap_or_default();
        let mut prep =
            stdio::prepare(&p.io_cfg, &path, exec_id, &self.namespace).map_err(internal)?;
        let pidfile = bundle.join(format!("{exec_id}.pid"));
        let pidfile_s = pidfile.to_string_lossy().into_owned();
        let spec_s = spec.to_string_lossy().into_owned();
        let mut args = vec![
            "exec",
            "--detach",
            "--pid-file",
            &pidfile_s,
            "--process",
            &spec_s,
        ];
        let cs;
        if let Some(c) = &prep.console {
            cs = c.path.to_string_lossy().into_owned();
            args.extend(["--console-socket", &cs]);
        }
        args.push(id);
        let master = match self.run_with_io(&rt, &args, &mut prep) {
            Ok(m) => m,
            Err(e) => {
                prep.abort();
                return Err(e);
            }
        };
        if let Some(m) = &master {
            sys::apply_console_size(m.as_raw_fd(), &spec);
        }
        let pid: u32 = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| internal("the runtime wrote no pid file"))?;
        let io = prep.finish(master).map_err(internal)?;
        let c = st.container(id)?;
        let p = c.process(exec_id)?;
        p.pid = pid;
        p.io = io;
        p.status = Status::RUNNING;
        let mut e = ev::TaskExecStarted::new();
        e.container_id = id.into();
        e.exec_id = exec_id.into();
        e.pid = pid;
        self.events.publish(&e);
        Ok(pid)
    }
}

fn status_of(p: &Proc) -> EnumOrUnknown<Status> {
    EnumOrUnknown::new(p.status)
}

impl containerd_shim_protos::Task for Service {
    fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TResult<api::StateResponse> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        let bundle = c.bundle.to_string_lossy().into_owned();
        let p = c.process(&req.exec_id)?;
        let mut r = api::StateResponse::new();
        r.id = if req.exec_id.is_empty() {
            req.id.clone()
        } else {
            req.exec_id.clone()
        };
        r.bundle = bundle;
        r.pid = p.pid;
        r.status = status_of(p);
        r.stdin = p.io_cfg.stdin.clone();
        r.stdout = p.io_cfg.stdout.clone();
        r.stderr = p.io_cfg.stderr.clone();
        r.terminal = p.io_cfg.terminal;
        r.exit_status = p.exit_status;
        r.exited_at = MessageField::from_option(p.exited_at.clone());
        r.exec_id = req.exec_id;
        Ok(r)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TResult<api::CreateTaskResponse> {
        let mut st = self.lock();
        if st.container.is_some() {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("container {}: already exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(err(
                Code::UNIMPLEMENTED,
                "restoring from a checkpoint is not supported by the berth shim",
            ));
        }
        let c = self.do_create(&mut st, &req)?;
        let mut e = ev::TaskCreate::new();
        e.container_id = req.id.clone();
        e.bundle = req.bundle.clone();
        e.rootfs = req.rootfs.clone();
        let mut tio = ev::TaskIO::new();
        tio.stdin = req.stdin.clone();
        tio.stdout = req.stdout.clone();
        tio.stderr = req.stderr.clone();
        tio.terminal = req.terminal;
        e.io = MessageField::some(tio);
        e.checkpoint = req.checkpoint.clone();
        e.pid = c.init.pid;
        let mut r = api::CreateTaskResponse::new();
        r.pid = c.init.pid;
        st.container = Some(c);
        self.events.publish(&e);
        Ok(r)
    }

    fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TResult<api::StartResponse> {
        let mut st = self.lock();
        let mut r = api::StartResponse::new();
        if !req.exec_id.is_empty() {
            r.pid = self.start_exec(&mut st, &req.id, &req.exec_id)?;
            return Ok(r);
        }
        let c = st.container(&req.id)?;
        if c.init.status != Status::CREATED {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not in the created state", req.id),
            ));
        }
        c.runtime
            .run_ok(&self.mon, &["start", &req.id], Stdios::default())
            .map_err(internal)?;
        if c.init.exited_at.is_none() {
            c.init.status = Status::RUNNING;
        }
        let mut e = ev::TaskStart::new();
        e.container_id = req.id.clone();
        e.pid = c.init.pid;
        r.pid = c.init.pid;
        self.events.publish(&e);
        Ok(r)
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TResult<api::DeleteResponse> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        let mut r = api::DeleteResponse::new();
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if matches!(p.status, Status::RUNNING | Status::PAUSED) {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("cannot delete running process {}", req.exec_id),
                ));
            }
            let p = c.execs.remove(&req.exec_id).unwrap();
            if let Some(s) = &p.spec {
                let _ = std::fs::remove_file(s);
            }
            let _ = std::fs::remove_file(c.bundle.join(format!("{}.pid", req.exec_id)));
            r.pid = p.pid;
            r.exit_status = p.exit_status;
            r.exited_at = MessageField::from_option(p.exited_at);
            return Ok(r);
        }
        if matches!(c.init.status, Status::RUNNING | Status::PAUSED) && c.init.exited_at.is_none() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("cannot delete running task {}", req.id),
            ));
        }
        let out = c
            .runtime
            .run(
                &self.mon,
                &["delete", "--force", &req.id],
                Stdios::default(),
            )
            .map_err(internal)?;
        if out.status != 0 {
            let e = c.runtime.error("delete", &out);
            if !e.to_string().contains("does not exist") {
                slog!("{e}");
            }
        }
        if let Some(r) = &c.rootfs {
            sys::unmount_all_in_background(r);
        }
        c.init.io.close_stdin();
        if c.init.exited_at.is_none() {
            c.init.exited(128 + libc::SIGKILL as u32);
        }
        let c = st.container.take().unwrap();
        r.pid = c.init.pid;
        r.exit_status = c.init.exit_status;
        r.exited_at = MessageField::from_option(c.init.exited_at.clone());
        let mut e = ev::TaskDelete::new();
        e.container_id = c.id.clone();
        e.pid = r.pid;
        e.exit_status = r.exit_status;
        e.exited_at = r.exited_at.clone();
        self.events.publish(&e);
        self.cv.notify_all();
        Ok(r)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TResult<api::PidsResponse> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        let out = c
            .runtime
            .run_ok(
                &self.mon,
                &["ps", "--format", "json", &req.id],
                Stdios::default(),
            )
            .map_err(internal)?;
        let mut r = api::PidsResponse::new();
        for pid in runc::parse_pids(&out.stdout) {
            let mut pi = ProcessInfo::new();
            pi.pid = pid;
            if let Some(p) = c.execs.values().find(|p| p.pid == pid) {
                let mut d = ProcessDetails::new();
                d.exec_id = p.exec_id.clone();
                let mut a = Any::new();
                a.type_url = "containerd.runc.v1.ProcessDetails".into();
                a.value = d.write_to_bytes().map_err(internal)?;
                pi.info = MessageField::some(a);
            }
            r.processes.push(pi);
        }
        Ok(r)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TResult<Empty> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        c.runtime
            .run_ok(&self.mon, &["pause", &req.id], Stdios::default())
            .map_err(internal)?;
        c.init.status = Status::PAUSED;
        let mut e = ev::TaskPaused::new();
        e.container_id = req.id;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TResult<Empty> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        c.runtime
            .run_ok(&self.mon, &["resume", &req.id], Stdios::default())
            .map_err(internal)?;
        if c.init.exited_at.is_none() {
            c.init.status = Status::RUNNING;
        }
        let mut e = ev::TaskResumed::new();
        e.container_id = req.id;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    fn checkpoint(&self, _ctx: &TtrpcContext, req: api::CheckpointTaskRequest) -> TResult<Empty> {
        if let Some(reason) = runc::criu_unusable() {
            return Err(err(Code::UNIMPLEMENTED, reason));
        }
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        let mut o = CheckpointOptions::new();
        if let Some(a) = req.options.as_ref()
            && a.type_url.ends_with("CheckpointOptions")
        {
            o = CheckpointOptions::parse_from_bytes(&a.value)
                .map_err(|e| err(Code::INVALID_ARGUMENT, e.to_string()))?;
        }
        let work = if o.work_path.is_empty() {
            c.bundle.join("criu-work").to_string_lossy().into_owned()
        } else {
            o.work_path.clone()
        };
        let image = if req.path.is_empty() {
            o.image_path.clone()
        } else {
            req.path.clone()
        };
        let mut args: Vec<String> = vec![
            "checkpoint".into(),
            "--image-path".into(),
            image.clone(),
            "--work-path".into(),
            work,
        ];
        if !o.exit {
            args.push("--leave-running".into());
        }
        for (flag, on) in [
            ("--tcp-established", o.open_tcp),
            ("--ext-unix-sk", o.external_unix_sockets),
            ("--shell-job", o.terminal),
            ("--file-locks", o.file_locks),
        ] {
            if on {
                args.push(flag.into());
            }
        }
        for ns in &o.empty_namespaces {
            args.push("--empty-ns".into());
            args.push(ns.clone());
        }
        args.push(req.id.clone());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        c.runtime
            .run_ok(&self.mon, &a, Stdios::default())
            .map_err(internal)?;
        let mut e = ev::TaskCheckpointed::new();
        e.container_id = req.id;
        e.checkpoint = image;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TResult<Empty> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        let sig = req.signal.to_string();
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.exited_at.is_some() || p.pid == 0 {
                return Err(err(
                    Code::NOT_FOUND,
                    format!(
                        "process {}: process already finished: not found",
                        req.exec_id
                    ),
                ));
            }
            sys::cvt(unsafe { libc::kill(p.pid as i32, req.signal as i32) }).map_err(internal)?;
            return Ok(Empty::new());
        }
        if c.init.exited_at.is_some() && !req.all {
            return Err(err(Code::NOT_FOUND, "process already finished: not found"));
        }
        let mut args = vec!["kill"];
        if req.all {
            args.push("--all");
        }
        args.extend([req.id.as_str(), sig.as_str()]);
        let out = c
            .runtime
            .run(&self.mon, &args, Stdios::default())
            .map_err(internal)?;
        if out.status != 0 {
            let e = c.runtime.error("kill", &out).to_string();
            if e.contains("not running")
                || e.contains("does not exist")
                || c.init.exited_at.is_some()
            {
                return Err(err(
                    Code::NOT_FOUND,
                    format!("process already finished: not found ({e})"),
                ));
            }
            return Err(err(Code::INTERNAL, e));
        }
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TResult<Empty> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
            return Err(err(
                Code::ALREADY_EXISTS,
                format!("exec process {}: already exists", req.exec_id),
            ));
        }
        if c.init.exited_at.is_some() {
            return Err(err(
                Code::FAILED_PRECONDITION,
                format!("container {} is not running", req.id),
            ));
        }
        if req.exec_id.contains('/') || req.exec_id.starts_with('.') {
            return Err(err(
                Code::INVALID_ARGUMENT,
                format!("invalid exec id {:?}", req.exec_id),
            ));
        }
        let spec = c.bundle.join(format!("{}.process.json", req.exec_id));
        let value = req
            .spec
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        std::fs::write(&spec, value).map_err(internal)?;
        let io = IoConfig {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut p = Proc::new(&req.exec_id, io);
        p.spec = Some(spec);
        c.execs.insert(req.exec_id.clone(), p);
        let mut e = ev::TaskExecAdded::new();
        e.container_id = req.id;
        e.exec_id = req.exec_id;
        self.events.publish(&e);
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TResult<Empty> {
        let mut st = self.lock();
        let p = st.container(&req.id)?.process(&req.exec_id)?;
        if let Some(m) = &p.io.console {
            use std::os::fd::AsRawFd;
            sys::set_winsize(m.as_raw_fd(), req.width, req.height).map_err(internal)?;
        }
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TResult<Empty> {
        let mut st = self.lock();
        let p = st.container(&req.id)?.process(&req.exec_id)?;
        if req.stdin {
            p.io.close_stdin();
        }
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TResult<Empty> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        let res = c.bundle.join("update-resources.json");
        let value = req
            .resources
            .as_ref()
            .map(|a| a.value.clone())
            .unwrap_or_default();
        std::fs::write(&res, value).map_err(internal)?;
        let res_s = res.to_string_lossy().into_owned();
        let r = c.runtime.run_ok(
            &self.mon,
            &["update", "--resources", &res_s, &req.id],
            Stdios::default(),
        );
        let _ = std::fs::remove_file(&res);
        r.map_err(internal)?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TResult<api::WaitResponse> {
        let mut st = self.lock();
        loop {
            let p = st.container(&req.id)?.process(&req.exec_id)?;
            if p.exited_at.is_some() {
                let mut r = api::WaitResponse::new();
                r.exit_status = p.exit_status;
                r.exited_at = MessageField::from_option(p.exited_at.clone());
                return Ok(r);
            }
            st = self
                .cv
                .wait_timeout(st, Duration::from_secs(60))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TResult<api::StatsResponse> {
        let mut st = self.lock();
        let c = st.container(&req.id)?;
        if c.cgroups.v1.is_empty() && c.cgroups.v2.is_none() {
            c.cgroups = Cgroups::of_pid(c.init.pid);
        }
        let mut r = api::StatsResponse::new();
        r.stats = MessageField::from_option(c.cgroups.metrics());
        Ok(r)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TResult<api::ConnectResponse> {
        let mut st = self.lock();
        let mut r = api::ConnectResponse::new();
        r.shim_pid = std::process::id();
        r.version = concat!("berth-shim ", env!("CARGO_PKG_VERSION")).into();
        if let Ok(c) = st.container(&req.id) {
            r.task_pid = c.init.pid;
        }
        Ok(r)
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TResult<Empty> {
        let st = self.lock();
        if st.container.is_some() && !req.now {
            return Ok(Empty::new());
        }
        drop(st);
        // The socket goes before the answer (as with containerd's runc shim): the daemon
        // does not wait for this process to exit, and a task created right after with the
        // same ID must get a new shim, not find this one still listening at that path.
        let _ = std::fs::remove_file(&self.socket);
        let _ = self.tx.lock().unwrap().send(Msg::Shutdown);
        Ok(Empty::new())
    }
}

/// Where the socket of the shim for (daemon address, namespace, id) lives.
pub fn socket_path(dir: &Path, address: &str, namespace: &str, id: &str) -> PathBuf {
    dir.join(sys::hash_hex(&[address, namespace, id]))
}
