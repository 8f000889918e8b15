//! Runs the OCI runtime (`runc`, or the configured `BinaryName` such as `crun`).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::monitor::Monitor;
use crate::sys;

pub const DEFAULT_ROOT: &str = "/run/containerd/runc";

/// Berth's own OCI runtime (crates/oci-runtime), this shim's default when it can run the
/// bundle: it does runc's work without starting Go programs (see its crate docs).
pub const BERTH_RUNC: &str = "berth-runc";
/// berth-runc's state root when none is configured: its state files are not runc's, so
/// the two never share a root.
pub const BERTH_RUNC_ROOT: &str = "/run/berth-runc";

/// The runtime to use when the options name none: berth-runc (found next to the shim,
/// then in PATH) when it can run this bundle exactly as runc would, else runc. The
/// reason is given when berth-runc is present but not chosen.
pub fn default_runtime(bundle: &Path) -> (String, Option<String>) {
    let next_to_shim = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(BERTH_RUNC)))
        .filter(|p| p.is_file());
    let Some(berth_runc) = next_to_shim.or_else(|| look_path(BERTH_RUNC)) else {
        return (String::new(), None);
    };
    match berth_runc_cannot_run(bundle) {
        None => (berth_runc.to_string_lossy().into_owned(), None),
        Some(why) => (String::new(), Some(why)),
    }
}

/// Why berth-runc must not run this bundle, or None when it can. A cheap test (a statfs
/// and a text search, not a spec decode) run in every shim; a false alarm only means
/// runc runs, and berth-runc's `create` checks exactly and refuses rather than skips.
fn berth_runc_cannot_run(bundle: &Path) -> Option<String> {
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c"/sys/fs/cgroup".as_ptr(), &mut fs) } == 0
        && fs.f_type == libc::CGROUP2_SUPER_MAGIC
    {
        return Some("cgroup v2 only host (berth-runc has no eBPF device filter)".into());
    }
    let config = std::fs::read(bundle.join("config.json")).ok()?;
    let has = |key: &[u8]| config.windows(key.len()).any(|w| w == key);
    if has(b"\"seccomp\"") {
        return Some("the spec has a seccomp profile (berth-runc has no libseccomp)".into());
    }
    // Quoted, as a JSON key or string value: rootfsPropagation, or a propagation option
    // of a mount (CRI gives every bind mount one).
    const PROPAGATION: [&[u8]; 9] = [
        b"\"rootfsPropagation\"",
        b"\"shared\"",
        b"\"rshared\"",
        b"\"slave\"",
        b"\"rslave\"",
        b"\"private\"",
        b"\"rprivate\"",
        b"\"unbindable\"",
        b"\"runbindable\"",
    ];
    if PROPAGATION.iter().any(|k| has(k)) {
        return Some(
            "the spec sets mount propagation (berth-runc cannot apply it as runc does)".into(),
        );
    }
    None
}

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

/// Why checkpoints cannot be taken on this host, if they cannot: criu is missing, or
/// installed but unable to run here (`criu check` fails, e.g. on kernels whose vDSO it
/// cannot parse).
pub fn criu_unusable() -> Option<String> {
    let Some(criu) = look_path("criu") else {
        return Some("checkpoint needs criu, which is not installed on this host".into());
    };
    let out = match Command::new(&criu)
        .arg("check")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => return None,
        Ok(out) => out,
        Err(e) => return Some(format!("checkpoint needs criu, which cannot run here: {e}")),
    };
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let first_error = text
        .lines()
        .find(|l| l.contains("Error"))
        .unwrap_or_else(|| text.lines().next().unwrap_or(""))
        .trim()
        .to_string();
    Some(format!(
        "checkpoint needs criu, which cannot run on this host (run `criu check`: {first_error})"
    ))
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
        let root = match root {
            "" if binary.file_name().is_some_and(|n| n == BERTH_RUNC) => BERTH_RUNC_ROOT,
            "" => DEFAULT_ROOT,
            r => r,
        };
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

/// `runtimeoptions.v1.Options` (what `ctr run --runtime-config-path FILE` and containerd's
/// CRI send for runtimes that are not named `io.containerd.runc.*`): a TOML document,
/// inline (`config_body`, field 3) or in a file (`config_path`, field 2), whose
/// `BinaryName` and `Root` keys select the OCI runtime (e.g. `BinaryName = "crun"`) the
/// way `containerd.runc.v1.Options` does. Returns (binary_name, root).
pub fn parse_runtime_options(message: &[u8]) -> io::Result<(String, String)> {
    let mut path = String::new();
    let mut body = Vec::new();
    let mut rest = message;
    while !rest.is_empty() {
        let (key, r) = varint(rest)?;
        rest = r;
        match key & 7 {
            0 => rest = varint(rest)?.1,
            2 => {
                let (len, r) = varint(rest)?;
                let len = usize::try_from(len).map_err(|_| bad_options())?;
                if r.len() < len {
                    return Err(bad_options());
                }
                let (value, r) = r.split_at(len);
                match key >> 3 {
                    2 => path = String::from_utf8_lossy(value).into_owned(),
                    3 => body = value.to_vec(),
                    _ => {}
                }
                rest = r;
            }
            _ => return Err(bad_options()),
        }
    }
    let text = if !body.is_empty() {
        String::from_utf8_lossy(&body).into_owned()
    } else if !path.is_empty() {
        std::fs::read_to_string(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("reading runtime config {path}: {e}")))?
    } else {
        String::new()
    };
    Ok((toml_str(&text, "BinaryName"), toml_str(&text, "Root")))
}

fn bad_options() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "malformed runtimeoptions.v1.Options",
    )
}

fn varint(mut b: &[u8]) -> io::Result<(u64, &[u8])> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, r) = b.split_first().ok_or_else(bad_options)?;
        b = r;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok((v, b));
        }
    }
    Err(bad_options())
}

/// The string value of a top-level `key = "value"` line of a small TOML document (the
/// runtime config files hold a few flat keys; anything else is ignored).
fn toml_str(text: &str, key: &str) -> String {
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            break;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        if k.trim().trim_matches('"') != key {
            continue;
        }
        let v = v.trim();
        if let Some(inner) = v.strip_prefix('"').and_then(|v| v.split('"').next()) {
            return inner.to_string();
        }
        if let Some(inner) = v.strip_prefix('\'').and_then(|v| v.split('\'').next()) {
            return inner.to_string();
        }
    }
    String::new()
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
    fn runtime_options() {
        // config_body (field 3) with a TOML document.
        let body =
            b"# crun\nBinaryName = \"crun\"\nRoot = '/run/crun'\n[other]\nBinaryName = \"x\"\n";
        let mut msg = vec![0x0a, 3, b'a', b'b', b'c', 0x1a, body.len() as u8];
        msg.extend_from_slice(body);
        assert_eq!(
            parse_runtime_options(&msg).unwrap(),
            ("crun".into(), "/run/crun".into())
        );
        // config_path (field 2).
        let f = std::env::temp_dir().join(format!("berth-shim-rtopt-{}", std::process::id()));
        std::fs::write(&f, "BinaryName=\"/usr/bin/crun\"\n").unwrap();
        let p = f.to_string_lossy().into_owned();
        let mut msg = vec![0x12, p.len() as u8];
        msg.extend_from_slice(p.as_bytes());
        assert_eq!(
            parse_runtime_options(&msg).unwrap(),
            ("/usr/bin/crun".into(), String::new())
        );
        std::fs::remove_file(&f).unwrap();
        assert!(parse_runtime_options(&[0x12, 5, b'a']).is_err());
        assert_eq!(
            parse_runtime_options(&[]).unwrap(),
            (String::new(), String::new())
        );
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
