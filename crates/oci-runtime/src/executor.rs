//! How the container's program is started, as runc does it: a name with a `/` is taken as
//! a path; any other name is looked up in the PATH of the process's own environment
//! (libcontainer's default executor insists on a PATH even for absolute paths, which
//! runc does not).

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use libcontainer::oci_spec::runtime::Spec;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};

#[derive(Clone)]
pub struct RuncLikeExecutor;

fn args(spec: &Spec) -> Result<&[String], String> {
    match spec.process().as_ref().and_then(|p| p.args().as_deref()) {
        Some(args) if !args.is_empty() && !args[0].is_empty() => Ok(args),
        _ => Err("the process has no args".into()),
    }
}

fn is_executable_file(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The file `name` runs, with `path` (a PATH value) for names without a `/`.
fn resolve(name: &str, path: Option<&str>) -> Result<PathBuf, String> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return match std::fs::metadata(&p) {
            Ok(_) if is_executable_file(&p) => Ok(p),
            Ok(_) => Err(format!("exec: {name:?}: permission denied")),
            // runc's (Go's) wording, which clients match on.
            Err(e) => Err(format!("exec: {name:?}: stat {name}: {}", go_style(&e))),
        };
    }
    path.unwrap_or("")
        .split(':')
        .map(|dir| Path::new(if dir.is_empty() { "." } else { dir }).join(name))
        .find(|p| is_executable_file(p))
        .ok_or_else(|| format!("exec: {name:?}: executable file not found in $PATH"))
}

/// An OS error as Go prints it: the lower-case strerror text, no "(os error N)".
fn go_style(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_lowercase(),
        None => e.to_string(),
    }
}

fn spec_path(spec: &Spec) -> Option<String> {
    spec.process()
        .as_ref()?
        .env()
        .as_ref()?
        .iter()
        .rev()
        .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
}

impl Executor for RuncLikeExecutor {
    fn validate(&self, spec: &Spec) -> Result<(), ExecutorValidationError> {
        let args = args(spec).map_err(ExecutorValidationError::ArgValidationError)?;
        resolve(&args[0], spec_path(spec).as_deref())
            .map(|_| ())
            .map_err(ExecutorValidationError::ArgValidationError)
    }

    fn exec(&self, spec: &Spec) -> Result<(), ExecutorError> {
        let args = args(spec).map_err(ExecutorError::Other)?;
        // setup_envs has replaced the environment with the process's.
        let path = std::env::var("PATH").ok();
        let file = resolve(&args[0], path.as_deref()).map_err(ExecutorError::Other)?;
        let to_c = |s: &[u8]| CString::new(s).map_err(|e| ExecutorError::Other(e.to_string()));
        let file = to_c(file.as_os_str().as_encoded_bytes())?;
        let argv = args
            .iter()
            .map(|a| to_c(a.as_bytes()))
            .collect::<Result<Vec<_>, _>>()?;
        let e = nix::unistd::execv(&file, &argv).unwrap_err();
        Err(ExecutorError::Other(format!("exec {:?}: {e}", args[0])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_like_runc() {
        assert_eq!(resolve("/bin/sh", None).unwrap(), PathBuf::from("/bin/sh"));
        assert_eq!(
            resolve("sh", Some("/nonexistent:/bin")).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert!(
            resolve("sh", None)
                .unwrap_err()
                .contains("not found in $PATH")
        );
        assert_eq!(
            resolve("/no/such", None).unwrap_err(),
            "exec: \"/no/such\": stat /no/such: no such file or directory"
        );
        let plain = std::env::temp_dir().join(format!("berth-runc-plain-{}", std::process::id()));
        std::fs::write(&plain, "not a program").unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = resolve(&plain.to_string_lossy(), None).unwrap_err();
        std::fs::remove_file(&plain).unwrap();
        assert!(e.contains("permission denied"), "{e}");
    }
}
