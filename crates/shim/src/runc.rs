//! Runs the OCI runtime (`runc`, or the configured `BinaryName` such as `crun`).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::monitor::Monitor;
use crate::sys;

pub const DEFAULT_ROOT: &str = "/run/containerd/runc";

#[derive(Clone, Debug)]
pub struct Runtime {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub log: PathBuf,
}

pub struct Output {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// The standard streams given to the runtime process (and, for `create`/`exec`, to the
/// container process).
#[derive(Default)]
pub struct Stdios {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

/// Finds `name` in PATH (absolute or relative paths are taken as they are).
pub fn look_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

impl Runtime {
    pub fn new(
        binary_name: &str,
        root: &str,
        namespace: &str,
        bundle: &Path,
    ) -> io::Result<Runtime> {
        let name = if binary_name.is_empty() {
            "runc"
        } else {
            binary_name
        };
        let binary = look_path(name).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("OCI runtime {name:?} not found in PATH"),
            )
        })?;
        let root = if root.is_empty() { DEFAULT_ROOT } else { root };
        Ok(Runtime {
            binary,
            root: Path::new(root).join(namespace),
            log: bundle.join("log.json"),
        })
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(&self.log)
            .args(["--log-format", "json"]);
        c.args(args);
        c
    }

    /// Runs a runtime command to completion, capturing stdout/stderr unless `stdio` gives them.
    pub fn run(&self, mon: &Monitor, args: &[&str], stdio: Stdios) -> io::Result<Output> {
        let mut c = self.command(args);
        let capture_out = stdio.stdout.is_none();
        let capture_err = stdio.stderr.is_none();
        c.stdin(stdio.stdin.map(Stdio::from).unwrap_or_else(Stdio::null));
        c.stdout(stdio.stdout.map(Stdio::from).unwrap_or_else(Stdio::piped));
        c.stderr(stdio.stderr.map(Stdio::from).unwrap_or_else(Stdio::piped));
        let mut child = mon.spawn(&mut c)?;
        drop(c); // close our copies of the stdio handed to the child
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        if capture_out && let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_end(&mut stdout);
        }
        if capture_err && let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_end(&mut stderr);
        }
        let status = mon.wait(child.id() as i32);
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Like [`Runtime::run`] but fails with the runtime's own error message on a non-zero exit.
    pub fn run_ok(&self, mon: &Monitor, args: &[&str], stdio: Stdios) -> io::Result<Output> {
        let out = self.run(mon, args, stdio)?;
        if out.status != 0 {
            return Err(self.error(args.first().copied().unwrap_or(""), &out));
        }
        Ok(out)
    }

    pub fn error(&self, what: &str, out: &Output) -> io::Error {
        let mut msg = self.last_log_error().unwrap_or_default();
        if msg.is_empty() {
            msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        }
        if msg.is_empty() {
            msg = format!("exit status {}", sys::exit_code(out.status));
        }
        io::Error::other(format!("{} {what} failed: {msg}", self.binary.display()))
    }

    /// The last error/fatal message in the runtime's JSON log.
    pub fn last_log_error(&self) -> Option<String> {
        let data = std::fs::read_to_string(&self.log).ok()?;
        data.lines()
            .rev()
            .take(50)
            .find(|l| {
                matches!(
                    sys::json_str(l, "level").as_deref(),
                    Some("error") | Some("fatal")
                )
            })
            .and_then(|l| sys::json_str(l, "msg"))
    }
}

/// Parses `runc ps --format json` output: a JSON array of pids.
pub fn parse_pids(out: &[u8]) -> Vec<u32> {
    String::from_utf8_lossy(out)
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Writes the runtime options needed by the `delete` action (a flat JSON object, named and
/// shaped like the Go runc shim's `options.json`).
pub fn write_options(bundle: &Path, binary_name: &str, root: &str) -> io::Result<()> {
    std::fs::write(
        bundle.join("options.json"),
        format!(
            "{{\"binary_name\":\"{}\",\"root\":\"{}\"}}",
            sys::json_escape(binary_name),
            sys::json_escape(root)
        ),
    )
}

pub fn read_options(bundle: &Path) -> (String, String) {
    let data = std::fs::read_to_string(bundle.join("options.json")).unwrap_or_default();
    (
        sys::json_str(&data, "binary_name").unwrap_or_default(),
        sys::json_str(&data, "root").unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pids() {
        assert_eq!(parse_pids(b"[12,345, 6]\n"), vec![12, 345, 6]);
        assert!(parse_pids(b"null").is_empty());
    }

    #[test]
    fn options_roundtrip() {
        let d = std::env::temp_dir().join(format!("berth-shim-opt-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        write_options(&d, "crun", "/run/x\"y").unwrap();
        assert_eq!(read_options(&d), ("crun".into(), "/run/x\"y".into()));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
