//! The commands: the part of runc's command line Berth's shim uses (`create`, `start`,
//! `exec`, `kill`, `ps`, `pause`, `resume`, `update`, `delete`), carried out by youki's
//! libcontainer. Errors are written as runc's JSON log lines (the shim reports the last
//! one) and to stderr.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use libcgroups::common::{
    AnyCgroupManager, CgroupConfig, CgroupManager, CgroupSetup, ControllerOpt,
    create_cgroup_manager, get_cgroup_setup,
};
use libcontainer::container::Container;
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::oci_spec::runtime::{LinuxResources, Spec};
use libcontainer::signal::Signal;
use libcontainer::syscall::syscall::SyscallType;

use crate::executor::RuncLikeExecutor;
use crate::{hierarchies, network};

/// The state directory when no `--root` is given (runc's is /run/containerd/runc under
/// containerd; the two must not share one, their state files differ).
pub const DEFAULT_ROOT: &str = "/run/berth-runc";

// libcontainer enforces cgroup v2 device rules only with eBPF support, which is not built
// in; runc does enforce them.
const V2_ONLY: &str = "cgroup v2 device rules need eBPF, which berth-runc is built without";
const SECCOMP: &str = "the spec has a seccomp profile; berth-runc is built without libseccomp";
/// libcontainer makes the root's propagation recursive whatever the spec says, knows no
/// `r…` variant there, and puts a mount's propagation option into the bind mount's own
/// flags, where the kernel ignores it (runc applies it with a second mount call).
const PROPAGATION: &str = "libcontainer does not apply mount propagation as runc does; berth-runc leaves such specs to runc";
/// The mount options that set propagation.
const PROPAGATION_OPTIONS: [&str; 8] = [
    "shared",
    "rshared",
    "slave",
    "rslave",
    "private",
    "rprivate",
    "unbindable",
    "runbindable",
];

/// What runc would enforce and berth-runc cannot is refused, never skipped. Returns the
/// spec.
fn check_supported(bundle: &str) -> Result<Spec, String> {
    match get_cgroup_setup() {
        Ok(CgroupSetup::Legacy | CgroupSetup::Hybrid) => {}
        Ok(CgroupSetup::Unified) => return Err(V2_ONLY.into()),
        Err(e) => return Err(format!("unknown cgroup layout: {e}")),
    }
    let spec = Spec::load(Path::new(bundle).join("config.json"))
        .map_err(|e| format!("config.json of {bundle}: {e}"))?;
    if spec.linux().as_ref().is_some_and(|l| l.seccomp().is_some()) {
        return Err(SECCOMP.into());
    }
    if let Some(p) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .filter(|p| !p.is_empty())
    {
        return Err(format!("rootfsPropagation {p:?}: {PROPAGATION}"));
    }
    for m in spec.mounts().iter().flatten() {
        if let Some(o) = m
            .options()
            .iter()
            .flatten()
            .find(|o| PROPAGATION_OPTIONS.contains(&o.as_str()))
        {
            return Err(format!(
                "mount {}: option {o:?}: {PROPAGATION}",
                m.destination().display()
            ));
        }
    }
    Ok(spec)
}

/// Runs one command (`args` after runc's global flags) against the state under `root`.
/// Returns the exit code.
pub fn run(root: &Path, log: Option<&Path>, args: &[&str]) -> i32 {
    match dispatch(root, args) {
        Ok(()) => 0,
        Err(msg) => {
            let line = serde_json::json!({"level": "error", "msg": msg}).to_string() + "\n";
            if let Some(log) = log
                && let Ok(mut f) = OpenOptions::new().create(true).append(true).open(log)
            {
                let _ = f.write_all(line.as_bytes());
            }
            let _ = writeln!(std::io::stderr(), "{msg}");
            1
        }
    }
}

#[derive(Default, Debug)]
struct Args<'a> {
    bundle: Option<&'a str>,
    pid_file: Option<&'a str>,
    console_socket: Option<&'a str>,
    process: Option<&'a str>,
    resources: Option<&'a str>,
    no_pivot: bool,
    force: bool,
    all: bool,
    /// `list --format`: "table" (the default) or "json".
    format: Option<&'a str>,
    /// `list -q`: IDs only.
    quiet: bool,
    positional: Vec<&'a str>,
}

fn parse<'a>(args: &[&'a str]) -> Result<Args<'a>, String> {
    let mut a = Args::default();
    let mut it = args.iter().copied();
    while let Some(arg) = it.next() {
        if arg == "-q" {
            a.quiet = true;
            continue;
        }
        let Some(flag) = arg.strip_prefix("--") else {
            a.positional.push(arg);
            continue;
        };
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("flag --{flag} needs a value"))
        };
        match flag {
            "bundle" => a.bundle = Some(value()?),
            "pid-file" => a.pid_file = Some(value()?),
            "console-socket" => a.console_socket = Some(value()?),
            "process" => a.process = Some(value()?),
            "resources" => a.resources = Some(value()?),
            "format" => a.format = Some(value()?),
            "quiet" => a.quiet = true,
            "no-pivot" => a.no_pivot = true,
            // libcontainer never makes a session keyring of its own; --detach is how the shim
            // runs exec, and the only way berth-runc runs it.
            "no-new-keyring" | "detach" => {}
            "force" => a.force = true,
            "all" => a.all = true,
            _ => return Err(format!("berth-runc has no flag --{flag}")),
        }
    }
    Ok(a)
}

fn dispatch(root: &Path, argv: &[&str]) -> Result<(), String> {
    let (&command, rest) = argv.split_first().ok_or("no command")?;
    let a = parse(rest)?;
    if command == "list" {
        return list(root, a.format.unwrap_or("table"), a.quiet);
    }
    let id = *a
        .positional
        .first()
        .ok_or_else(|| format!("{command}: no container id"))?;
    match command {
        "create" => {
            let bundle = a.bundle.ok_or("create: no --bundle")?;
            let spec = check_supported(bundle).map_err(|e| format!("create {id}: {e}"))?;
            // Absolute, as containerd always gives it; libcontainer resolves it the same.
            let unmanaged = spec
                .linux()
                .as_ref()
                .and_then(|l| l.cgroups_path().clone())
                .filter(|p| p.is_absolute());
            let me = std::process::id() as i32;
            let undo = |path: &Option<PathBuf>| {
                if let Some(path) = path {
                    hierarchies::leave(me);
                    let _ = hierarchies::remove(path);
                }
            };
            if let Some(path) = &unmanaged
                && let Err(e) = hierarchies::join(path, me)
            {
                undo(&unmanaged);
                return Err(format!("create {id}: {e}"));
            }
            let built = ContainerBuilder::new(id.to_string(), SyscallType::default())
                .with_root_path(root)
                .and_then(|b| b.with_pid_file(a.pid_file))
                .map(|b| b.with_console_socket(a.console_socket))
                .and_then(|b| b.validate_id())
                .map(|b| b.with_executor(RuncLikeExecutor))
                .and_then(|b| {
                    b.as_init(bundle)
                        .with_systemd(false)
                        .with_detach(true)
                        .with_no_pivot(a.no_pivot)
                        .build()
                })
                .map_err(|e| format!("create {id}: {e}"));
            let mut container = match built {
                Ok(c) => c,
                Err(e) => {
                    undo(&unmanaged);
                    return Err(e);
                }
            };
            let configured = match container.pid() {
                None => Err("the created container has no pid".to_string()),
                Some(pid) if network::creates_network_namespace(&spec) => {
                    network::bring_up_loopback(pid.as_raw())
                }
                Some(_) => Ok(()),
            };
            if let Err(e) = configured {
                // As runc does when its setup fails: no container is left.
                let _ = container.delete(true);
                undo(&unmanaged);
                return Err(format!("create {id}: {e}"));
            }
            Ok(())
        }
        "exec" => {
            let process = a.process.ok_or("exec: no --process")?;
            // Joined first, so the process is born there (see `hierarchies`).
            let path = cgroup_path(&load(root, id)?, id)?;
            hierarchies::join(&path, std::process::id() as i32)
                .map_err(|e| format!("exec in {id}: {e}"))?;
            ContainerBuilder::new(id.to_string(), SyscallType::default())
                .with_root_path(root)
                .and_then(|b| b.with_pid_file(a.pid_file))
                .map(|b| b.with_console_socket(a.console_socket))
                .map(|b| b.with_executor(RuncLikeExecutor))
                .and_then(|b| {
                    b.as_tenant()
                        .with_detach(true)
                        .with_process(Some(process))
                        .build()
                })
                .map_err(|e| format!("exec in {id}: {e}"))?;
            Ok(())
        }
        "state" => {
            let state = state_of(&load(root, id)?, root)?;
            let text = serde_json::to_string_pretty(&state).map_err(|e| e.to_string())?;
            let _ = writeln!(std::io::stdout(), "{text}");
            Ok(())
        }
        "start" => load(root, id)?
            .start()
            .map_err(|e| format!("start {id}: {e}")),
        "kill" => {
            let signal = parse_signal(a.positional.get(1).copied().unwrap_or("SIGTERM"))?;
            let mut c = load(root, id)?;
            if !a.all && !c.can_kill() {
                return Err(format!("container {id} is not running"));
            }
            c.kill(signal, a.all).map_err(|e| format!("kill {id}: {e}"))
        }
        "delete" => {
            let mut container = load(root, id)?;
            let path = cgroup_path(&container, id)?;
            container
                .delete(a.force)
                .map_err(|e| format!("delete {id}: {e}"))?;
            hierarchies::remove(&path).map_err(|e| format!("delete {id}: {e}"))
        }
        "pause" => load(root, id)?
            .pause()
            .map_err(|e| format!("pause {id}: {e}")),
        "resume" => load(root, id)?
            .resume()
            .map_err(|e| format!("resume {id}: {e}")),
        "ps" => {
            let pids = cgroup_manager(&load(root, id)?, id)?
                .get_all_pids()
                .map_err(|e| format!("ps {id}: {e}"))?;
            let list: Vec<String> = pids.iter().map(|p| p.as_raw().to_string()).collect();
            let _ = writeln!(std::io::stdout(), "[{}]", list.join(","));
            Ok(())
        }
        "update" => {
            let path = a.resources.ok_or("update: no --resources")?;
            let data = std::fs::read(path).map_err(|e| format!("update: reading {path}: {e}"))?;
            let resources: LinuxResources = serde_json::from_slice(&data)
                .map_err(|e| format!("update: resources of {id}: {e}"))?;
            cgroup_manager(&load(root, id)?, id)?
                .apply(&ControllerOpt {
                    resources: &resources,
                    disable_oom_killer: false,
                    oom_score_adj: None,
                    freezer_state: None,
                })
                .map_err(|e| format!("update {id}: {e}"))
        }
        other => Err(format!(
            "{other} is not supported by berth-runc (set BinaryName = \"runc\")"
        )),
    }
}

fn load(root: &Path, id: &str) -> Result<Container, String> {
    let dir: PathBuf = root.join(id);
    if id.contains('/') || !dir.join("state.json").exists() {
        return Err(format!("container {id} does not exist"));
    }
    let mut c = Container::load(dir).map_err(|e| format!("loading container {id}: {e}"))?;
    c.refresh_status()
        .map_err(|e| format!("status of container {id}: {e}"))?;
    Ok(c)
}

/// `state`'s JSON, in runc's shape (the OCI state plus `rootfs`, `created`, `owner`).
fn state_of(c: &Container, root: &Path) -> Result<serde_json::Value, String> {
    use std::os::unix::fs::MetadataExt;
    let bundle = c.bundle();
    let spec = Spec::load(bundle.join("config.json")).ok();
    let rootfs = spec
        .as_ref()
        .and_then(|s| s.root().as_ref().map(|r| r.path().clone()))
        .map(|p| if p.is_absolute() { p } else { bundle.join(p) })
        .unwrap_or_default();
    let owner = match std::fs::metadata(root.join(c.id())).map(|m| m.uid()) {
        Ok(0) => "root".to_string(),
        Ok(uid) => uid.to_string(),
        Err(_) => String::new(),
    };
    Ok(serde_json::json!({
        "ociVersion": spec.as_ref().map(|s| s.version().clone()).unwrap_or_default(),
        "id": c.id(),
        "pid": c.pid().map(|p| p.as_raw()).unwrap_or(0),
        "status": c.status().to_string().to_lowercase(),
        "bundle": bundle,
        "rootfs": rootfs,
        "created": serde_json::to_value(c.created()).unwrap_or_default(),
        "owner": owner,
    }))
}

/// `list`: every container under `root`, as runc prints them.
fn list(root: &Path, format: &str, quiet: bool) -> Result<(), String> {
    let mut states = Vec::new();
    let mut ids: Vec<String> = match std::fs::read_dir(root) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.path().join("state.json").is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(format!("list: reading {}: {e}", root.display())),
    };
    ids.sort();
    for id in &ids {
        // A container deleted meanwhile is simply not listed.
        if let Ok(c) = load(root, id) {
            states.push(state_of(&c, root)?);
        }
    }
    let mut out = String::new();
    if quiet {
        for s in &states {
            out.push_str(s["id"].as_str().unwrap_or_default());
            out.push('\n');
        }
    } else if format == "json" {
        out = serde_json::to_string(&states).map_err(|e| e.to_string())? + "\n";
    } else if format == "table" {
        let header = ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"];
        let mut rows = vec![header.map(String::from).to_vec()];
        for s in &states {
            let field = |k: &str| match &s[k] {
                serde_json::Value::String(v) => v.clone(),
                other => other.to_string(),
            };
            rows.push(header.map(|h| field(&h.to_lowercase())).to_vec());
        }
        // runc's tabwriter: columns at least 12 wide, 3 spaces of padding.
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].len() + 3)
                    .max()
                    .unwrap_or(0)
                    .max(12)
            })
            .collect();
        for row in rows {
            let last = row.len() - 1;
            for (i, cell) in row.iter().enumerate() {
                if i == last {
                    out.push_str(cell);
                } else {
                    out.push_str(&format!("{cell:<w$}", w = widths[i]));
                }
            }
            out.push('\n');
        }
    } else {
        return Err(format!("list: invalid format {format:?}"));
    }
    let _ = std::io::stdout().write_all(out.as_bytes());
    Ok(())
}

/// The container's cgroup path, as libcontainer resolved it at create.
fn cgroup_path(c: &Container, id: &str) -> Result<PathBuf, String> {
    Ok(c.spec()
        .map_err(|e| format!("config of container {id}: {e}"))?
        .cgroup_path)
}

fn cgroup_manager(c: &Container, id: &str) -> Result<AnyCgroupManager, String> {
    let cgroup_path = cgroup_path(c, id)?;
    create_cgroup_manager(CgroupConfig {
        cgroup_path,
        systemd_cgroup: false,
        container_name: id.to_string(),
    })
    .map_err(|e| format!("cgroup of container {id}: {e}"))
}

/// A signal as runc takes it: a number, or a name with or without "SIG".
fn parse_signal(s: &str) -> Result<Signal, String> {
    match s.parse::<i32>() {
        Ok(n) => Signal::try_from(n).map_err(|e| format!("signal {n}: {e}")),
        Err(_) => Signal::try_from(s).map_err(|e| format!("signal {s:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_style_arguments_are_parsed() {
        let a = parse(&[
            "--bundle",
            "/b",
            "--pid-file",
            "/b/init.pid",
            "--no-pivot",
            "--no-new-keyring",
            "id1",
        ])
        .unwrap();
        assert_eq!(
            (a.bundle, a.pid_file, a.no_pivot, a.positional),
            (Some("/b"), Some("/b/init.pid"), true, vec!["id1"])
        );
        let a = parse(&["--all", "id1", "9"]).unwrap();
        assert!(a.all);
        assert_eq!(a.positional, vec!["id1", "9"]);
        assert!(parse(&["--bundle"]).unwrap_err().contains("needs a value"));
        assert!(
            parse(&["--criu", "x"])
                .unwrap_err()
                .contains("no flag --criu")
        );
    }

    #[test]
    fn signals_by_number_and_name() {
        for s in ["9", "KILL", "SIGKILL"] {
            assert_eq!(format!("{:?}", parse_signal(s).unwrap()), "Signal(SIGKILL)");
        }
        assert!(parse_signal("SIGNOPE").is_err());
    }

    #[test]
    fn commands_name_what_is_missing() {
        let root = std::env::temp_dir().join(format!("berth-runc-test-{}", std::process::id()));
        assert!(
            dispatch(&root, &["start", "nope"])
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(
            dispatch(&root, &["checkpoint", "x"])
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            dispatch(&root, &["create", "x"])
                .unwrap_err()
                .contains("no --bundle")
        );
    }
}
