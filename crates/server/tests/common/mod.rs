//! Starts a private `berthd` for a test and cleans up after it.
//!
//! Each daemon gets a fresh directory under /tmp (short, so socket paths stay far below
//! the 108-byte limit) holding its root, state, sockets, config and log. Dropping the
//! handle kills the daemon by PID and removes the directory.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BERTHD: &str = env!("CARGO_BIN_EXE_berthd");
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh directory under /tmp, removed on drop.
pub struct TestDir(pub PathBuf);

impl TestDir {
    pub fn new() -> TestDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = PathBuf::from(format!("/tmp/bd-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TestDir(path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The config every test daemon uses: everything inside its own directory. `top` holds
/// top-level keys, `tables` extra sections; `@DIR@` in them stands for the directory.
pub fn config_text(dir: &Path, top: &str, tables: &str) -> String {
    let d = dir.display();
    let top = top.replace("@DIR@", &d.to_string());
    let tables = tables.replace("@DIR@", &d.to_string());
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
{top}

[grpc]
  address = "{d}/b.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

{tables}
"#
    )
}

pub struct Daemon {
    pub dir: TestDir,
    pub socket: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts a daemon and waits until its gRPC socket accepts connections.
    pub fn start(top: &str, tables: &str) -> Daemon {
        match Daemon::try_start(top, tables, &[]) {
            Ok(daemon) => daemon,
            Err((status, log)) => panic!("berthd did not start ({status:?}):\n{log}"),
        }
    }

    /// Like [`Daemon::start`], returning the exit status and log if it exits instead.
    pub fn try_start(
        top: &str,
        tables: &str,
        extra_args: &[&str],
    ) -> Result<Daemon, (Option<ExitStatus>, String)> {
        let dir = TestDir::new();
        let config = dir.path("config.toml");
        std::fs::write(&config, config_text(&dir.0, top, tables)).unwrap();
        let log = std::fs::File::create(dir.path("berthd.log")).unwrap();
        let child = Command::new(BERTHD)
            .arg("--config")
            .arg(&config)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning berthd");
        let mut daemon = Daemon {
            socket: dir.path("b.sock"),
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = daemon.child.as_mut().unwrap().try_wait().unwrap() {
                daemon.child = None;
                return Err((Some(status), daemon.log()));
            }
            if UnixStream::connect(&daemon.socket).is_ok() {
                return Ok(daemon);
            }
            if Instant::now() > deadline {
                return Err((None, daemon.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("daemon running").id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path("berthd.log")).unwrap_or_default()
    }

    pub fn address(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// Runs `ctr --address <socket> args…`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("running ctr (Debian's containerd package)")
    }

    /// Runs ctr and returns its stdout, failing the test if ctr fails.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let output = self.ctr(args);
        assert!(
            output.status.success(),
            "ctr {args:?} failed: {}\n--- berthd log ---\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).unwrap()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits for the daemon to exit (after a signal), returning its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("daemon running");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "berthd did not exit in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `berthd args…` to completion.
pub fn berthd(args: &[&str]) -> Output {
    Command::new(BERTHD)
        .args(args)
        .output()
        .expect("running berthd")
}

/// A child process whose stdout lines arrive on a channel (e.g. `ctr events`).
pub struct LineReader {
    child: Child,
    pub lines: mpsc::Receiver<String>,
}

impl LineReader {
    pub fn spawn(command: &mut Command) -> LineReader {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning a reader");
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        LineReader { child, lines }
    }
}

impl Drop for LineReader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the stock `ctr` is installed (Debian's containerd package).
pub fn have_ctr() -> bool {
    Command::new("ctr")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}
