//! `containerd-shim-berth-v2`: Berth's containerd runtime v2 shim (`io.containerd.berth.v2`).
//!
//! Synchronous by design, to stay small in memory: the ttrpc sync server, one monitor
//! thread (child reaping via signalfd + OOM eventfds), and the main thread handling exits.
//!
//! Invocations (flags in Go's single-dash style, as containerd passes them):
//! - `... -namespace NS -address ADDR -publish-binary BIN -id ID start`: creates the socket,
//!   starts the long-running shim server in the background, prints the socket address.
//! - `... -id ID -bundle B delete`: cleans up after a dead shim; prints a DeleteResponse.
//! - no action: the shim server itself (started by `start`, listening socket on fd 3).

#[macro_use]
mod sys;
mod cgroups;
mod events;
mod monitor;
mod mounts;
mod runc;
mod service;
mod stdio;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};

use crate::monitor::{Monitor, Msg};

const DEFAULT_SOCKET_DIR: &str = "/run/berth/s";

#[derive(Default, Debug)]
struct Flags {
    namespace: String,
    address: String,
    publish_binary: String,
    id: String,
    bundle: String,
    debug: bool,
    version: bool,
    action: String,
}

fn parse_flags(args: &[String]) -> Result<Flags, String> {
    let mut f = Flags::default();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if !a.starts_with('-') || a == "-" {
            f.action = a.clone();
            continue;
        }
        let name = a.trim_start_matches('-');
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        match name {
            "debug" => f.debug = inline.map(|v| v != "false").unwrap_or(true),
            "v" | "version" => f.version = true,
            _ => {
                let v = match inline {
                    Some(v) => v,
                    None => {
                        let v = args
                            .get(i)
                            .cloned()
                            .ok_or_else(|| format!("flag needs an argument: -{name}"))?;
                        i += 1;
                        v
                    }
                };
                match name {
                    "namespace" => f.namespace = v,
                    "address" => f.address = v,
                    "publish-binary" => f.publish_binary = v,
                    "id" => f.id = v,
                    "bundle" => f.bundle = v,
                    // Accepted and ignored (other shims' flags containerd versions may pass).
                    "socket" | "runtime-root" | "criu" | "systemd-cgroup" => {}
                    _ => return Err(format!("flag provided but not defined: -{name}")),
                }
            }
        }
    }
    Ok(f)
}

fn socket_dir() -> PathBuf {
    std::env::var_os("BERTH_SHIM_SOCKET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_DIR))
}

fn main() {
    // One malloc arena: the shim has several threads but very little concurrency.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flags = match parse_flags(&args) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if flags.version {
        println!(
            "containerd-shim-berth-v2 {} (runtime io.containerd.berth.v2, task API v2)",
            env!("CARGO_PKG_VERSION")
        );
        return;
    }
    let r = match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" => serve(&flags),
        other => Err(format!("unknown action {other:?}")),
    };
    if let Err(e) = r {
        let _ = writeln!(std::io::stderr(), "containerd-shim-berth-v2: {e}");
        std::process::exit(1);
    }
}

fn validate(flags: &Flags) -> Result<(), String> {
    if flags.namespace.is_empty() {
        return Err("shim namespace cannot be empty".into());
    }
    if flags.id.is_empty() {
        return Err("shim id cannot be empty".into());
    }
    Ok(())
}

/// `start`: bind the socket, spawn the server with it as fd 3, print the address.
fn start(flags: &Flags) -> Result<(), String> {
    validate(flags)?;
    // containerd sends the runtime options on stdin; drain them.
    let mut opts = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut opts);
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let path = service::socket_path(&dir, &flags.address, &flags.namespace, &flags.id);
    let address = format!("unix://{}", path.display());
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(&path).is_ok() {
                // A shim for this id already serves there: hand back its address.
                write_address(&address)?;
                print!("{address}");
                return Ok(());
            }
            let _ = std::fs::remove_file(&path);
            UnixListener::bind(&path).map_err(|e| format!("binding {}: {e}", path.display()))?
        }
        Err(e) => return Err(format!("binding {}: {e}", path.display())),
    };
    let exe = std::env::current_exe().map_err(|e| format!("finding own binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &flags.address,
    ]);
    if !flags.publish_binary.is_empty() {
        cmd.args(["-publish-binary", &flags.publish_binary]);
    }
    if flags.debug {
        cmd.arg("-debug");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    // containerd reads the shim's log from the `log` fifo in the bundle.
    match sys::open(Path::new("log"), libc::O_WRONLY | libc::O_NONBLOCK, 0) {
        Ok(f) => {
            let _ = sys::set_nonblock(f.as_raw_fd(), false);
            cmd.stderr(f);
        }
        Err(_) => {
            cmd.stderr(Stdio::null());
        }
    }
    let lfd = listener.as_raw_fd();
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if lfd == 3 {
                let fl = libc::fcntl(3, libc::F_GETFD);
                libc::fcntl(3, libc::F_SETFD, fl & !libc::FD_CLOEXEC);
            } else if libc::dup2(lfd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        let _ = std::fs::remove_file(&path);
        format!("starting the shim server: {e}")
    })?;
    let _ = std::fs::write("shim.pid", child.id().to_string());
    write_address(&address)?;
    print!("{address}");
    let _ = std::io::stdout().flush();
    Ok(())
}

fn write_address(address: &str) -> Result<(), String> {
    std::fs::write("address", address).map_err(|e| format!("writing the address file: {e}"))
}

/// `delete`: clean up what a dead shim left; print a DeleteResponse.
fn delete(flags: &Flags) -> Result<(), String> {
    validate(flags)?;
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().map_err(|e| e.to_string())?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let (bin, root) = runc::read_options(&bundle);
    if let Ok(rt) = runc::Runtime::new(&bin, &root, &flags.namespace, &bundle) {
        let out = rt
            .command(&["delete", "--force", &flags.id])
            .stdin(Stdio::null())
            .output();
        if let Ok(o) = out
            && !o.status.success()
        {
            slog!(
                "delete action: runtime delete: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
    }
    sys::unmount_all(&bundle.join("rootfs"));
    let _ = std::fs::remove_file(service::socket_path(
        &socket_dir(),
        &flags.address,
        &flags.namespace,
        &flags.id,
    ));
    let pid: u32 = std::fs::read_to_string(bundle.join("init.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut r = DeleteResponse::new();
    r.pid = pid;
    r.exit_status = 128 + libc::SIGKILL as u32;
    r.exited_at = MessageField::some(sys::now());
    let bytes = r.write_to_bytes().map_err(|e| e.to_string())?;
    std::io::stdout()
        .write_all(&bytes)
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The shim server.
fn serve(flags: &Flags) -> Result<(), String> {
    validate(flags)?;
    // Must precede every thread: they all inherit the blocked SIGCHLD.
    monitor::block_sigchld().map_err(|e| e.to_string())?;
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        let fl = libc::fcntl(3, libc::F_GETFD);
        if fl < 0 {
            return Err("no listening socket on fd 3 (run the shim with the start action)".into());
        }
        libc::fcntl(3, libc::F_SETFD, fl | libc::FD_CLOEXEC);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let mon = Monitor::start(tx.clone()).map_err(|e| format!("starting the monitor: {e}"))?;
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").unwrap_or_default();
    let publisher = Arc::new(events::Publisher::new(
        &flags.namespace,
        &ttrpc_address,
        &flags.address,
        &flags.publish_binary,
        tx.clone(),
    ));
    let dir = socket_dir();
    let socket = service::socket_path(&dir, &flags.address, &flags.namespace, &flags.id);
    let svc = Arc::new(service::Service::new(
        &flags.namespace,
        dir.clone(),
        socket.clone(),
        mon,
        publisher.clone(),
        tx,
    ));
    let task: Arc<dyn containerd_shim_protos::Task + Send + Sync> = svc.clone();
    let mut server = containerd_shim_protos::ttrpc::Server::new()
        .add_listener(3)
        .map_err(|e| format!("ttrpc listener: {e:?}"))?
        .register_service(containerd_shim_protos::create_task(task))
        .set_thread_count_min(1)
        .set_thread_count_default(2)
        .set_thread_count_max(4);
    server.start().map_err(|e| format!("ttrpc server: {e:?}"))?;
    let mut next = None;
    loop {
        let msg = match next.take() {
            Some(msg) => msg,
            None => match rx.recv() {
                Ok(msg) => msg,
                Err(_) => break,
            },
        };
        match msg {
            Msg::Exit { pid, status } => svc.handle_exit(pid, status),
            Msg::Oom { container_id } => svc.handle_oom(&container_id),
            Msg::Event { topic, any } => {
                publisher.deliver(topic, &any);
                // Events come in bursts (create/start, exit/delete) with a container's
                // lifetime in between: hang up once the queue is empty, so that the
                // daemon keeps no connection (and its buffers and tasks) per idle shim.
                match rx.try_recv() {
                    Ok(msg) => next = Some(msg),
                    Err(_) => publisher.disconnect(),
                }
            }
            Msg::Shutdown => break,
        }
    }
    // No pause for the Shutdown reply: both containerd and berthd treat the connection
    // closing as a completed Shutdown (the socket file is already gone, see
    // `Service::shutdown`), so a delay here only lengthens every task deletion.
    let _ = std::fs::remove_file(&socket);
    std::process::exit(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags() {
        let f = parse_flags(&v(&[
            "-namespace",
            "ns",
            "-address",
            "/a.sock",
            "-publish-binary",
            "/bin/c",
            "-id",
            "x",
            "start",
        ]))
        .unwrap();
        assert_eq!(
            (
                f.namespace.as_str(),
                f.address.as_str(),
                f.id.as_str(),
                f.action.as_str()
            ),
            ("ns", "/a.sock", "x", "start")
        );
        let f = parse_flags(&v(&[
            "--namespace=ns",
            "-debug",
            "-id",
            "x",
            "-bundle",
            "/b",
            "delete",
        ]))
        .unwrap();
        assert!(f.debug);
        assert_eq!((f.bundle.as_str(), f.action.as_str()), ("/b", "delete"));
        assert!(parse_flags(&v(&["-bogus", "1"])).is_err());
        assert!(parse_flags(&v(&["-id"])).is_err());
    }
}
