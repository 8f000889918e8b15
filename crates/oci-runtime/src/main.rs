//! `berth-runc`: an OCI runtime with runc's command line (the part a containerd shim
//! uses, and `state`/`list` for operators), built on youki's libcontainer. Berth's shim runs it instead of runc by default.
//!
//! Why: runc is a Go program, and starting one costs ~12 ms on the hosts Berth is
//! measured on; a `ctr run --rm` starts runc three times (create, start, delete) plus
//! `runc init`, ~50 of runc's ~62 ms. berth-runc is a static Rust binary that starts in
//! ~2 ms and never re-executes itself for the container's init (libcontainer clones).
//!
//! Usage: `berth-runc [--root DIR] [--log FILE] [--log-format json] COMMAND [FLAGS] ID …`
//! with runc's commands and flags (see `commands`).

mod commands;
mod executor;
mod hierarchies;
mod network;
mod sealed;

use std::path::PathBuf;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut root = PathBuf::from(commands::DEFAULT_ROOT);
    let mut log = None;
    let mut rest = args.as_slice();
    while let Some((flag, tail)) = rest.split_first() {
        let Some(name) = flag.strip_prefix("--") else {
            break;
        };
        let (name, inline) = match name.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (name, None),
        };
        let takes_value = matches!(name, "root" | "log" | "log-format" | "criu");
        let (value, tail) = match (takes_value, inline) {
            (true, Some(v)) => (v, tail),
            (true, None) => match tail.split_first() {
                Some((v, t)) => (v.clone(), t),
                None => fail(&format!("flag --{name} needs a value")),
            },
            (false, _) => (String::new(), tail),
        };
        match name {
            "root" => root = PathBuf::from(value),
            "log" => log = Some(PathBuf::from(value)),
            "log-format" if value == "json" || value == "text" => {}
            "debug" | "criu" => {}
            "version" => {
                println!("berth-runc {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            "systemd-cgroup" => fail("berth-runc manages cgroups itself (no --systemd-cgroup)"),
            _ => fail(&format!("berth-runc has no global flag --{name}")),
        }
        rest = tail;
    }
    let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
    if matches!(rest.first(), Some(&"create") | Some(&"exec"))
        && let Err(e) = sealed::reexec_from_unwritable_view(&empty_dir(&root))
    {
        fail(&format!(
            "re-running berth-runc from an unwritable view of itself: {e}"
        ));
    }
    std::process::exit(commands::run(&root, log.as_deref(), &rest));
}

/// The empty directory the overlay view needs, beside the state root (shims give each
/// namespace its own root; this way a namespace's root is left empty once its last
/// container is deleted).
fn empty_dir(root: &std::path::Path) -> PathBuf {
    root.parent().unwrap_or(root).join(".berth-runc-empty")
}

fn fail(msg: &str) -> ! {
    eprintln!("berth-runc: {msg}");
    std::process::exit(2);
}
